"""Opening a Kedro project the way every kvx-runtime command needs it.

Bootstrapping is shared by ``exec-node``, the MLflow commands and the compiler: find the
project, read its settings, decide the config environment, read ``vertexai.yml``, and install
the templating config loader. Kedro's CLI is never involved (it would discover every plugin
command and could prompt for telemetry consent).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from kvx_runtime.config import ALL_KEYS, PluginConfig, load_plugin_config
from kvx_runtime.config_loader import DISABLE_ENV_VAR, DISABLED_WARNING, with_env_templating
from kvx_runtime.errors import ConfigError, UsageError
from kvx_runtime.log import configure_logging, get_logger
from kvx_runtime.settings import AIRFLOW_PASSWORD, AIRFLOW_TOKEN, KFP_TOKEN

__all__ = ["MLFLOW_PLUGINS", "KedroProject", "open_project", "untracked_context"]

log = get_logger(__name__)

#: Set in every step: kedro-telemetry must neither prompt nor call home from a container.
TELEMETRY_OFF = {
    "KEDRO_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
    "MLFLOW_DISABLE_TELEMETRY": "true",
}
_TELEMETRY_PLUGINS = ("kedro-telemetry", "kedro_telemetry")
#: kedro-mlflow's names: a session that must not track is created without its hooks.
MLFLOW_PLUGINS = ("kedro-mlflow", "kedro_mlflow")
#: Environment variables whose values are secrets wherever they would appear.
ENVIRONMENT_SECRETS = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "DEX_PASSWORD", "KF_PIPELINES_TOKEN",
                       KFP_TOKEN.name, AIRFLOW_TOKEN.name, AIRFLOW_PASSWORD.name)


@dataclass
class KedroProject:
    """A bootstrapped Kedro project plus its kvx-runtime configuration."""

    path: Path
    package_name: str
    conf_source: str
    env: str
    base_env: str
    plugin_config: PluginConfig
    templating: bool

    @property
    def conf_root(self) -> Path:
        return Path(self.conf_source)


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in {"1", "true", "yes", "on"}


def _import_kedro_quietly() -> None:
    """Import Kedro's project module (it configures logging on import), then take logging back."""
    os.environ.setdefault("KEDRO_LOGGING_CONFIG", str(Path(__file__).with_name("kedro_logging.yml")))
    if "dynaconf" not in sys.modules:
        from kvx_runtime.lazy_imports import optional_modules_hidden

        # Kedro's settings are a dynaconf object, and dynaconf imports its Flask integration when
        # Flask is installed (MLflow's server brings it): 50 ms of every step, never used.
        with optional_modules_hidden("flask"):
            import dynaconf  # noqa: F401
    import kedro.framework.project  # noqa: F401

    configure_logging()


def _bootstrap(project_path: Path) -> Any:
    _import_kedro_quietly()
    from kedro.framework.startup import bootstrap_project

    if not (project_path / "pyproject.toml").is_file():
        raise UsageError(
            f"{project_path} is not a Kedro project (no pyproject.toml)",
            hint="run from the project directory or pass --project-path",
        )
    try:
        metadata = bootstrap_project(project_path)
    except RuntimeError as exc:
        raise UsageError(f"{project_path} is not a Kedro project: {exc}") from None
    except Exception as exc:  # its settings.py (or what it imports) raised
        raise ConfigError(
            f"the Kedro project at {project_path} cannot be imported: {type(exc).__name__}: {exc}"
        ) from exc
    finally:
        configure_logging()  # bootstrapping re-applied Kedro's logging config
    return metadata


def disable_plugin_hooks(settings: Any, plugins: Iterable[str]) -> None:
    current = tuple(getattr(settings, "DISABLE_HOOKS_FOR_PLUGINS", ()) or ())
    wanted = current + tuple(p for p in plugins if p not in current)
    settings.set("DISABLE_HOOKS_FOR_PLUGINS", wanted)


def install_templating(settings: Any) -> bool:
    """Make the project's config loader fill ``${name}`` from ``KEDRO_CONFIG_*``.

    Returns False (after the seed's warning) when disabled with
    ``KEDRO_VERTEXAI_DISABLE_CONFIG_HOOK=true`` or when the project's loader is not built on
    ``OmegaConfigLoader``.
    """
    if _truthy(os.environ.get(DISABLE_ENV_VAR)):
        log.warning(DISABLED_WARNING)
        return False
    current = settings.CONFIG_LOADER_CLASS
    templated = with_env_templating(current)
    if templated is None:
        log.warning(
            "the project's CONFIG_LOADER_CLASS is not an OmegaConfigLoader; "
            "${name} placeholders from KEDRO_CONFIG_* will not be filled",
            loader=f"{current.__module__}.{current.__qualname__}",
        )
        return False
    if templated is not current:
        settings.set("CONFIG_LOADER_CLASS", templated)
    return True


def _kedro_table(project_path: Path) -> Mapping[str, Any]:
    """pyproject.toml's ``[tool.kedro]``, without importing the project."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10 (Kedro depends on tomli there)
        import tomli as tomllib

    pyproject = project_path / "pyproject.toml"
    try:
        table = tomllib.loads(pyproject.read_text(encoding="utf-8"))["tool"]["kedro"]
        str(table["package_name"])
    except (OSError, KeyError, TypeError, ValueError):
        raise UsageError(
            f"{project_path} is not a Kedro project (no [tool.kedro] package_name in pyproject.toml)",
            hint="run from the project directory or pass --project-path",
        ) from None
    return dict(table)


def find_package_name(project_path: Path) -> str:
    """The project's package name from pyproject.toml ([tool.kedro]), without importing it."""
    return str(_kedro_table(project_path)["package_name"])


def source_dir_of(project_path: Path) -> str:
    """The folder Kedro imports the project's package from (``[tool.kedro] source_dir``, Kedro's
    default ``src``), relative to the project (POSIX; ``.`` for the project itself). One
    outside the project, or absolute (Kedro resolves it against wherever the project is
    bootstrapped: a step's code archive is elsewhere), is a ConfigError."""
    import posixpath

    folder = str(_kedro_table(project_path).get("source_dir", "src"))
    relative = Path(folder).expanduser()
    if relative.is_absolute():
        raise ConfigError(f"{project_path / 'pyproject.toml'}: [tool.kedro] source_dir {folder!r} is absolute, so "
                          "it cannot name the package's folder anywhere but on this machine",
                          hint='make it relative to the project, e.g. source_dir = "src"')
    normalized = posixpath.normpath(relative.as_posix())
    if normalized == ".." or normalized.startswith("../"):
        raise ConfigError(f"{project_path / 'pyproject.toml'}: [tool.kedro] source_dir {folder!r} is outside "
                          "the project", hint='keep the package in a folder of the project, e.g. source_dir = "src"')
    return normalized


#: Kedro's default ``CONF_SOURCE``.
DEFAULT_CONF_FOLDER = "conf"


def conf_folder_of(project_path: Path, *, import_settings: bool = True) -> str:
    """The project's configuration folder, relative to the project (POSIX): ``CONF_SOURCE`` as
    its settings.py sets it, else Kedro's ``conf``. A plain string is read, not imported (``init``
    writes before the project's dependencies may be installed); any other value is what
    importing the project's settings gives (with ``import_settings``; else a ConfigError). A
    folder outside the project, which init and the project image cannot use, is a ConfigError."""
    import ast

    table = _kedro_table(project_path)
    settings = project_path / str(table.get("source_dir", "src")) / str(table["package_name"]) / "settings.py"
    try:
        tree = ast.parse(settings.read_text(encoding="utf-8"), str(settings))
    except FileNotFoundError:
        return DEFAULT_CONF_FOLDER
    except (OSError, SyntaxError, ValueError) as exc:
        raise ConfigError(f"{settings} cannot be read: {exc}") from None
    folder = DEFAULT_CONF_FOLDER
    top_level = {id(statement) for statement in tree.body}
    computed = False
    for statement in ast.walk(tree):
        targets = statement.targets if isinstance(statement, ast.Assign) else \
            [statement.target] if isinstance(statement, (ast.AnnAssign, ast.AugAssign)) else []
        if not any(isinstance(target, ast.Name) and target.id == "CONF_SOURCE" for target in targets):
            continue
        value = getattr(statement, "value", None)
        if id(statement) in top_level and not isinstance(statement, ast.AugAssign) \
                and isinstance(value, ast.Constant) and isinstance(value.value, str):
            folder = value.value
        else:  # computed, conditional or appended to: only running settings.py tells
            computed = True
    if computed:
        if not import_settings:
            raise ConfigError(f"{settings}: CONF_SOURCE is not a plain string, and the project is not imported here")
        folder = _imported_conf_source(project_path, str(table["package_name"]), settings)
    relative = Path(folder)
    if relative.is_absolute() and "://" not in folder:
        try:
            relative = relative.resolve().relative_to(project_path.resolve())
        except ValueError:
            pass
    if "://" in folder or relative.is_absolute() or ".." in relative.parts or not relative.parts:
        raise ConfigError(f"{settings}: CONF_SOURCE {folder!r} is not a folder of the project: kvx-runtime writes "
                          "the configuration there and the project image copies it from the project",
                          hint='set it to a folder of the project, e.g. CONF_SOURCE = "conf"')
    from kvx_runtime.config.files import is_conf_archive

    if is_conf_archive(relative.name) or (project_path / relative).is_file():
        raise ConfigError(f"{settings}: CONF_SOURCE {folder!r} is an archive: init writes the configuration "
                          "into a folder, and the project image and code upload carry a folder",
                          hint="keep the configuration as a folder of the project (compile, run-local and "
                               "the steps read an archive too)")
    return relative.as_posix()


def _imported_conf_source(project_path: Path, package_name: str, settings_file: Path) -> str:
    """``CONF_SOURCE`` as running the project's settings.py gives it: the file run as a module of
    its own (its ``__file__`` the file's), with the project's source folder importable for its
    own imports. Not through Kedro: its lazy settings swallow an ImportError in settings.py and
    fall back to ``conf``, and bootstrapping would configure this process's Kedro settings and
    keep ``<package>.settings`` imported for a project this process may never open."""
    import importlib.util

    source_dir = str(settings_file.parent.parent)
    added = source_dir not in sys.path
    if added:
        sys.path.insert(0, source_dir)
    spec = importlib.util.spec_from_file_location(f"{package_name}.settings", settings_file)
    assert spec is not None and spec.loader is not None  # a .py file
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        raise ConfigError(f"the project's settings.py cannot be imported to tell CONF_SOURCE: "
                          f"{type(exc).__name__}: {exc}",
                          hint="install the project's requirements, or set CONF_SOURCE to a plain string") from None
    finally:
        if added and source_dir in sys.path:
            sys.path.remove(source_dir)
    return str(getattr(module, "CONF_SOURCE", DEFAULT_CONF_FOLDER))


#: Kedro's own default run environment: the laptop's, holding credentials, left out of images.
LAPTOP_ENV = "local"


def default_env(loader_args: dict[str, Any]) -> str:
    """The config environment when neither ``--env`` nor ``KEDRO_ENV`` names one.

    The project's ``default_run_env``, unless that is ``local``: Kedro's default for the
    laptop, which holds credentials and which project images leave out (our .dockerignore
    does, rightly). Steps compiled without ``--env`` then run in ``base`` (``base_env``),
    which every image contains, on Vertex AI and in run-local alike.
    """
    configured = str(loader_args.get("default_run_env") or LAPTOP_ENV)
    if configured == LAPTOP_ENV:
        return str(loader_args.get("base_env") or "base")
    return configured


def check_env_exists(conf_source: str, env: str, base_env: str) -> None:
    """A missing environment directory is a configuration error naming the fix."""
    from kvx_runtime.config.files import conf_filesystem, is_conf_archive

    if is_conf_archive(conf_source):
        fs, root = conf_filesystem(conf_source)
        missing = [name for name in dict.fromkeys([base_env, env]) if not fs.isdir(f"{root}/{name}")]
        if missing:
            held = sorted(PurePosixPath(path).name for path in fs.ls(root, detail=False) if fs.isdir(path))
            raise ConfigError(f"config environment '{missing[0]}' is not in the configuration archive "
                              f"{conf_source} (it holds: {', '.join(held) or 'no environment'})",
                              hint="pass --env with an environment the archive holds")
        return
    if "://" in conf_source or not Path(conf_source).is_dir():
        return  # remote configuration: Kedro reports what is missing
    for name in dict.fromkeys([base_env, env]):
        directory = Path(conf_source) / name
        if not directory.is_dir():
            hint = (
                f"pass --env with an environment that exists here (e.g. --env {base_env}); "
                "conf/local is usually left out of images by .dockerignore: compile without "
                f"--env (steps then use '{base_env}') or with an environment the image contains"
                if name != base_env
                else f"the project's base configuration must exist at {directory}"
            )
            raise ConfigError(
                f"config environment '{name}' does not exist: {directory} is missing", hint=hint
            )


def open_project(
    project_path: str | Path | None,
    env: str | None,
    *,
    needed: Iterable[str] = ALL_KEYS,
    templating: bool = True,
    code_dir: Path | None = None,
) -> KedroProject:
    """Bootstrap the Kedro project at ``project_path`` (default: the working directory).

    ``env`` falls back to ``KEDRO_ENV``, then to :func:`default_env`. With ``code_dir`` (an
    unpacked code archive), the package and ``conf/`` come from there while the project
    directory (relative data paths) stays ``project_path``.
    """
    for key, value in TELEMETRY_OFF.items():
        os.environ[key] = value
    path = Path(project_path or os.getcwd()).expanduser().resolve()
    code_root = code_dir.resolve() if code_dir is not None else path
    metadata = _bootstrap(code_root)
    if code_dir is not None:
        from kvx_runtime.code_upload import check_package_from_archive

        check_package_from_archive(code_root, metadata.package_name)

    from kedro.framework.project import settings

    disable_plugin_hooks(settings, _TELEMETRY_PLUGINS)
    loader_args = dict(getattr(settings, "CONFIG_LOADER_ARGS", {}) or {})
    base_env = str(loader_args.get("base_env") or "base")
    resolved_env = env or os.environ.get("KEDRO_ENV") or default_env(loader_args)
    conf_source = str(settings.CONF_SOURCE)
    if "://" not in conf_source and not Path(conf_source).is_absolute():
        conf_source = str(code_root / conf_source)
    check_env_exists(conf_source, resolved_env, base_env)
    merge_strategy = (loader_args.get("merge_strategy") or {}).get("vertexai", "destructive")
    templated = install_templating(settings) if templating else False
    plugin_config = load_plugin_config(
        conf_source, resolved_env, base_env=base_env, merge_strategy=merge_strategy, needed=needed
    )
    project = KedroProject(
        path=path,
        package_name=metadata.package_name,
        conf_source=conf_source,
        env=resolved_env,
        base_env=base_env,
        plugin_config=plugin_config,
        templating=templated,
    )
    register_credentials(project)
    s3 = plugin_config.run_config.s3
    from kvx_runtime.storage.store import configure_s3

    configure_s3(s3.endpoint_url, s3.region, replace=True)  # none of a project opened before
    return project


def register_credentials(project: KedroProject) -> None:
    """Have every value of the project's credentials redacted from all log lines (best effort:
    credentials that cannot be loaded are reported by Kedro, where they are used)."""
    from kvx_runtime.log import register_secrets

    # Cloud credentials that libraries read from the environment (S3/MinIO, KFP tokens).
    register_secrets([os.environ.get(name) for name in ENVIRONMENT_SECRETS])
    try:
        credentials = make_config_loader(project)["credentials"]
    except Exception:
        return
    register_secrets([credentials])


def _normalize(name: str) -> str:
    return name.replace("_", "-").lower()


@contextmanager
def untracked_context(project: KedroProject, storage_root: str,
                      runtime_params: Mapping[str, Any] | None = None, *,
                      parameters_untyped: bool = False) -> Iterator[Any]:
    """The Kedro context of ``project``'s env as its steps load it (``runtime_params`` merged,
    ``${storage_root}`` the run's root, the run's identity as exported), created without
    kedro-mlflow's hooks: compile, ``plan`` and the step cache's planning must not start MLflow
    runs or contact a tracking server. ``parameters_untyped``: no node of the project types its
    parameters (:func:`kvx_runtime.cache.pipeline_memo.parameters_untyped`), so Kedro need not
    import every pipeline to find out."""
    from kedro.framework.project import settings
    from kedro.framework.session import KedroSession

    from kvx_runtime.config_loader import exported_storage_root

    disable_plugin_hooks(settings, MLFLOW_PLUGINS)
    with entry_points_of_disabled_plugins_not_loaded(settings):
        session = KedroSession.create(project.path, env=project.env, runtime_params=dict(runtime_params or {}) or None,
                                      conf_source=project.conf_source)
    with session, exported_storage_root(storage_root):
        context = session.load_context()
        if parameters_untyped and hasattr(context, "_pipelines_to_validate"):
            context._pipelines_to_validate = []  # types by the annotations of no pipeline: none has any
        yield context


@contextmanager
def entry_points_of_disabled_plugins_not_loaded(settings: Any) -> Iterator[None]:
    """While a session is created, do not even import hooks of disabled plugins.

    Kedro imports every ``kedro.hooks`` entry point and only then unregisters disabled ones,
    so a disabled kedro-mlflow still costs a step over a second of importing mlflow. pluggy
    skips blocked names before importing them, so the names of disabled distributions are
    blocked on the session's hook manager as it is created. Purely an optimisation: if
    Kedro's internals differ, sessions are created the normal way.
    """
    from importlib.metadata import entry_points

    import kedro.framework.session.session as session_module

    original = getattr(session_module, "_create_hook_manager", None)
    disabled = {_normalize(name) for name in getattr(settings, "DISABLE_HOOKS_FOR_PLUGINS", ())}
    blocked = [
        ep.name
        for ep in entry_points(group="kedro.hooks")
        if ep.dist is not None and _normalize(ep.dist.name) in disabled
    ]
    if original is None or not blocked:
        yield
        return

    def create_hook_manager() -> Any:
        manager = original()
        for name in blocked:
            manager.set_blocked(name)
        return manager

    session_module._create_hook_manager = create_hook_manager
    try:
        yield
    finally:
        session_module._create_hook_manager = original


def has_config(project: KedroProject, pattern: str) -> bool:
    """Does ``conf/<base or env>/`` hold a file matching ``pattern`` (e.g. ``mlflow*``)? The
    configuration read as Kedro reads it: a folder, local or remote, or an archive."""
    from kvx_runtime.config.files import conf_files

    return any(conf_files(project.conf_source, f"{env_name}/{pattern}")
               for env_name in {project.base_env, project.env})


def make_config_loader(project: KedroProject, runtime_params: dict[str, Any] | None = None) -> Any:
    """The project's config loader, as its sessions build it (no session, no hooks)."""
    from kedro.framework.project import settings

    return settings.CONFIG_LOADER_CLASS(
        conf_source=project.conf_source,
        env=project.env,
        runtime_params=runtime_params,
        **settings.CONFIG_LOADER_ARGS,
    )


def catalog_patterns(project: KedroProject) -> list[str]:
    """Where the project's config loader finds catalog files in an environment (Kedro's
    ``catalog*`` patterns, or the project's own ``CONFIG_LOADER_ARGS``)."""
    return list(make_config_loader(project).config_patterns["catalog"])


def catalog_config(project: KedroProject, runtime_params: dict[str, Any] | None = None) -> dict[str, Any]:
    """The merged catalog configuration (``{}`` when the project has none)."""
    from kedro.config import MissingConfigException

    try:
        return dict(make_config_loader(project, runtime_params)["catalog"] or {})
    except MissingConfigException:
        return {}
