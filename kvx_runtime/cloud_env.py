"""A cloud environment in one command (``init --cloud-env NAME``): ``conf/NAME/catalog.yml``, a
Kedro env overlay that puts every catalog dataset of the base env on a local path under the
run's storage root.

Each pipeline step runs on its own machine: a dataset one step writes to ``data/...`` is not on
the disk of the step that reads it. The overlay gives each such entry the same relative path
under ``${storage_root}``, which the steps fill from their storage root
(:mod:`kvx_runtime.config.storage_root` says what it means where), so that one file serves
run-local, a test root and the cloud. It is written once and reviewed like any config: nothing
is rewritten at run time.

Kedro replaces a top-level catalog entry of the base env wholesale with the env's entry of the
same key, so each overlay entry is the whole base entry (type, arguments, credentials,
``versioned``...) as written (the user's own ``${...}`` kept), with only its path changed.
Which entries: those whose path, resolved as the env resolves it, is relative (entries on a
remote protocol, in memory, without a path, absolute or outside the project are left as they
are, and the file's header says so); factory patterns alike. ``per_run`` puts what the
pipelines write under ``${storage_root}/${run_id}/``; their inputs stay shared.
"""

from __future__ import annotations

import copy
import posixpath
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from kvx_runtime.config.storage_root import configured_storage_root
from kvx_runtime.config_loader import CONFIG_SUFFIXES, STORAGE_ROOT_PLACEHOLDER
from kvx_runtime.errors import ConfigError, KvxError, UsageError

if TYPE_CHECKING:
    from kvx_runtime.project import KedroProject

__all__ = ["CATALOG_FILE", "CloudEnv", "LeftOut", "Redirected", "check_env_name", "overlay_envs", "plan_cloud_env",
           "written_cloud_envs"]

#: The overlay's file in ``conf/<env>/``.
CATALOG_FILE = "catalog.yml"
#: Kedro's config environment of the laptop (credentials, never in an image): not a cloud env.
_LAPTOP_ENV = "local"
#: A folder name every file system and Kedro accept (Kedro skips hidden folders).
_ENV_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
#: Dataset types that hold data in memory: no path to move.
_MEMORY_TYPES = {"MemoryDataset", "SharedMemoryDataset"}
#: Where a dataset's path may be, in the order Kedro's datasets name it.
_PATH_KEYS = ("filepath", "path")
_PLACEHOLDER = "${%s}" % STORAGE_ROOT_PLACEHOLDER
_RUN_ID = "${run_id}"


@dataclass(frozen=True)
class Redirected:
    """A catalog entry (or factory pattern) the overlay puts under the storage root."""

    name: str
    #: Its path as conf/base writes it, and as the overlay writes it.
    path: str
    new_path: str


@dataclass(frozen=True)
class LeftOut:
    """A catalog entry the overlay leaves as it is, and why."""

    name: str
    reason: str


@dataclass(frozen=True)
class CloudEnv:
    """What ``init --cloud-env`` writes, and what it tells the user."""

    name: str
    #: ``conf/<name>/catalog.yml``.
    path: Path
    text: str
    redirected: tuple[Redirected, ...]
    left_out: tuple[LeftOut, ...]
    #: Local paths (relative to the project) of the pipelines' inputs the overlay redirects:
    #: they are read from the storage root, so they must be copied there.
    inputs: tuple[str, ...]
    #: Does a plain ``kedro run --env <name>`` fill ``${storage_root}`` (the project's
    #: settings name kvx-runtime's config loader)?
    kedro_run_fills_placeholder: bool
    #: Where the env's ``run_config.root`` is read from: the configuration, the env whose
    #: plugin config applies (the env itself when its folder exists) and the base env.
    conf_source: str
    root_env: str
    base_env: str

    def configured_root(self) -> str | None:
        """The storage root the env's ``run_config.root`` names now (None: none, or unreadable)."""
        try:
            return configured_storage_root(self.conf_source, self.root_env, self.base_env)
        except KvxError:
            return None  # the commands that need it say what is wrong with it

    def copy_lines(self, root: str | None) -> list[str]:
        """Which local files or folders to copy where under ``root``, one line per folder."""
        root = root or "<storage root>"
        folders: dict[str, list[str]] = {}
        for path in self.inputs:
            folder, _, name = path.rpartition("/")
            folders.setdefault(folder, []).append(name)
        lines = []
        for folder, names in folders.items():
            target = f"{root}/{folder}/" if folder else f"{root}/"
            lines.append(f"  {folder + '/' if folder else './'} -> {target}  ({', '.join(sorted(names))})")
        return lines


def check_env_name(name: str, base_env: str) -> None:
    """A cloud env is a folder of its own next to the base env: not the base env, not the
    laptop's ``local``, and a plain folder name."""
    if name in (base_env, _LAPTOP_ENV):
        raise UsageError(
            f"--cloud-env {name!r}: conf/{name} is Kedro's {'base' if name == base_env else 'laptop'} environment, "
            "not an overlay of its own",
            hint="name another environment, e.g. --cloud-env cloud",
        )
    if not _ENV_NAME.match(name) or name in (".", ".."):
        raise UsageError(f"--cloud-env {name!r} is not a folder name for conf/",
                         hint="letters, digits, '_', '-' and '.', starting with a letter or digit")


def plan_cloud_env(project: KedroProject, name: str, *, per_run: bool = False,
                   kedro_run_fills_placeholder: bool = True) -> CloudEnv:
    """The overlay of env ``name`` for ``project`` (opened with its templating loader): which
    entries it redirects, its text, the inputs to copy. Writes nothing; refuses (exit 2) a bad
    name and a catalog without a dataset on a local path."""
    check_env_name(name, project.base_env)
    conf = project.conf_root
    if "://" in project.conf_source or not conf.is_dir():
        raise UsageError(f"the project's configuration ({project.conf_source}) is not a folder: "
                         "init --cloud-env writes into conf/<env>/")
    overlay = conf / name / CATALOG_FILE
    env_exists = (conf / name).is_dir()
    resolving_env = name if env_exists else project.base_env
    from kvx_runtime.project import catalog_patterns

    patterns = catalog_patterns(project)
    base_raw = _raw_entries(_catalog_files(conf / project.base_env, patterns, hidden=None))
    env_raw = _raw_entries(_catalog_files(conf / name, patterns, hidden=overlay)) if env_exists else {}
    resolved = _resolved_catalog(project, resolving_env, hidden=overlay)
    written, inputs = _pipeline_datasets()
    governing = _Governing(resolved)
    written_keys = {governing.key(dataset) for dataset in written} - {None}
    input_keys = {governing.key(dataset) for dataset in inputs} - {None}

    redirected: list[Redirected] = []
    left_out: list[LeftOut] = []
    entries: dict[str, Any] = {}
    for key, raw in base_raw.items():
        if key.startswith("_"):
            continue  # a YAML variable of the file, not a dataset: copied below when used
        if key in env_raw:
            left_out.append(LeftOut(key, f"conf/{name} defines it already"))
            continue
        entry = resolved.get(key)
        if not isinstance(entry, dict):
            continue
        why, where = _why_not_redirected(entry)
        if why is None and (not isinstance(raw, dict) or not isinstance(_get(raw, where), str)):
            why = "written through an interpolation: move it by hand"
        if why is not None:
            left_out.append(LeftOut(key, why))
            continue
        raw_path = str(_get(raw, where))
        isolated = per_run and key in written_keys and key not in input_keys
        new_path = _under_root(raw_path, isolated)
        moved = copy.deepcopy(raw)
        _set(moved, where, new_path)
        entries[key] = moved
        redirected.append(Redirected(key, raw_path, new_path))
    if not redirected:
        shown = "; ".join(f"{item.name}: {item.reason}" for item in left_out[:3])
        raise UsageError(
            f"conf/{project.base_env}'s catalog has no dataset on a local path, so there is nothing to put under "
            f"the storage root; conf/{name}/{CATALOG_FILE} was not written" + (f" ({shown})" if shown else ""),
        )

    variables = {key: raw for key, raw in base_raw.items() if key.startswith("_") and key not in env_raw
                 and any("${" + key in yaml.safe_dump(entry) for entry in entries.values())}
    copy_inputs = _input_paths(inputs, governing, {item.name for item in redirected})
    env = CloudEnv(name=name, path=overlay, text="", redirected=tuple(redirected), left_out=tuple(left_out),
                   inputs=tuple(copy_inputs), kedro_run_fills_placeholder=kedro_run_fills_placeholder,
                   conf_source=project.conf_source, root_env=resolving_env, base_env=project.base_env)
    text = _render(name, project.base_env, {**variables, **entries}, left_out, copy_inputs, env.configured_root(),
                   per_run)
    return replace(env, text=text)


# --- reading the catalog ---------------------------------------------------------------------


def _catalog_files(directory: Path, patterns: Iterable[str], hidden: Path | None) -> list[Path]:
    """The catalog files of one env folder, as Kedro finds them (hidden ones skipped), in a
    stable order; ``hidden`` left out."""
    found = {path for pattern in patterns for path in directory.glob(pattern)
             if path.is_file() and path.suffix in CONFIG_SUFFIXES}
    visible = [path for path in found if not any(part.startswith(".") for part in path.relative_to(directory).parts)]
    return sorted(path for path in visible if hidden is None or path.resolve() != hidden.resolve())


def _raw_entries(files: list[Path]) -> dict[str, Any]:
    """The top-level entries of ``files`` as written (placeholders unresolved), in file order."""
    from kvx_runtime.config.yaml_text import load_yaml

    entries: dict[str, Any] = {}
    for path in files:
        data = load_yaml(path.read_text(encoding="utf-8"), str(path))
        if data is None:
            continue
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
        for key, value in data.items():
            entries.setdefault(str(key), value)
    return entries


class _HidingFileSystem:
    """The loader's file system with one file not found by ``glob`` (the overlay being replaced)."""

    def __init__(self, fs: Any, hidden: Path) -> None:
        self._fs = fs
        self._hidden = hidden.resolve()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._fs, name)

    def glob(self, pattern: str, *args: Any, **kwargs: Any) -> Any:
        return [path for path in self._fs.glob(pattern, *args, **kwargs) if Path(str(path)).resolve() != self._hidden]


def _resolved_catalog(project: KedroProject, env: str, hidden: Path) -> dict[str, Any]:
    """The catalog as env ``env`` resolves it without ``hidden`` (an overlay ``--force``
    replaces): what decides which paths are local."""
    from kedro.config import MissingConfigException
    from kedro.framework.project import settings

    loader_class: type = settings.CONFIG_LOADER_CLASS

    class WithoutOverlay(loader_class):  # the project's loader class
        def _initialise_filesystem_and_protocol(self, conf_source: str) -> tuple[Any, str]:
            fs, protocol = super()._initialise_filesystem_and_protocol(conf_source)
            return _HidingFileSystem(fs, hidden), protocol

    without_overlay: Any = WithoutOverlay
    try:
        loader = without_overlay(conf_source=project.conf_source, env=env, **settings.CONFIG_LOADER_ARGS)
        return dict(loader["catalog"] or {})
    except MissingConfigException:
        return {}
    except KvxError:
        raise
    except Exception as exc:
        first = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise ConfigError(f"the catalog of env {env} cannot be loaded: {type(exc).__name__}: {first}") from exc


def _pipeline_datasets() -> tuple[set[str], set[str]]:
    """(datasets some node of a registered pipeline writes, datasets nodes read and none writes)."""
    from kedro.framework.project import pipelines

    from kvx_runtime.graph import dataset_identity
    from kvx_runtime.project_pipelines import registered_pipeline_names

    try:
        nodes = [node for name in registered_pipeline_names() for node in pipelines[name].nodes]
    except Exception as exc:
        raise ConfigError(f"the project's pipelines cannot be loaded: {type(exc).__name__}: {exc}") from exc
    written = {out for node in nodes for out in node.outputs}
    identities = {dataset_identity(name) for name in written}
    read = {name for node in nodes for name in node.inputs
            if not name.startswith("params:") and name != "parameters"}
    return written, {name for name in read if dataset_identity(name) not in identities}


class _Governing:
    """Which catalog key (an entry or a factory pattern) a dataset name takes its config from."""

    def __init__(self, resolved: Mapping[str, Any]) -> None:
        from kedro.io.catalog_config_resolver import CatalogConfigResolver

        # Credentials only name what the catalog would fetch: not needed to match names.
        config = {key: {k: v for k, v in entry.items() if k != "credentials"}
                  for key, entry in resolved.items() if isinstance(entry, dict)}
        self._explicit = {key for key in config if "{" not in key}
        self._resolver = CatalogConfigResolver(
            config=config, default_runtime_patterns={"{default}": {"type": "kedro.io.MemoryDataset"}})

    def key(self, dataset: str) -> str | None:
        if dataset in self._explicit:
            return dataset
        return self._resolver.match_dataset_pattern(dataset) or self._resolver.match_user_catch_all_pattern(dataset)

    def resolved(self, dataset: str) -> dict[str, Any]:
        return dict(self._resolver.resolve_pattern(dataset))


# --- deciding ------------------------------------------------------------------------------


def _path_location(entry: Mapping[str, Any]) -> tuple[str, ...] | None:
    """Where the entry's path is: ``("filepath",)``, ``("path",)`` or in its wrapped dataset."""
    for key in _PATH_KEYS:
        if isinstance(entry.get(key), str):
            return (key,)
    inner = entry.get("dataset")
    if isinstance(inner, dict):
        for key in _PATH_KEYS:
            if isinstance(inner.get(key), str):
                return ("dataset", key)
    return None


def _get(entry: Any, where: tuple[str, ...] | None) -> Any:
    for key in where or ():
        if not isinstance(entry, dict):
            return None
        entry = entry.get(key)
    return entry


def _set(entry: dict[str, Any], where: tuple[str, ...] | None, value: str) -> None:
    assert where
    for key in where[:-1]:
        entry = entry[key]
    entry[where[-1]] = value


def _why_not_redirected(entry: Mapping[str, Any]) -> tuple[str | None, tuple[str, ...] | None]:
    """(why the overlay leaves the resolved ``entry`` as it is, None to redirect it; where its path is)."""
    kind = str(entry.get("type", "")).rsplit(".", 1)[-1]
    if kind in _MEMORY_TYPES:
        return f"{kind}: in memory, no path", None
    where = _path_location(entry)
    if where is None:
        return "no path", None
    path = str(_get(entry, where))
    scheme, sep, _ = path.partition("://")
    if sep and scheme.lower() != "file":
        return f"already on {scheme.lower()}://", where
    local = path.removeprefix("file://")
    if local.startswith(("/", "~")) or re.match(r"^[A-Za-z]:[\\/]", local):
        return f"an absolute path ({local}): a mount every step sees? Otherwise make it relative", where
    if posixpath.normpath(local).startswith(".."):
        return f"outside the project ({local})", where
    return None, where


def _under_root(raw_path: str, per_run: bool) -> str:
    """``data/x.csv`` -> ``${storage_root}/data/x.csv`` (``${storage_root}/${run_id}/...``)."""
    relative = raw_path.removeprefix("file://")
    relative = posixpath.normpath(relative) if "${" not in relative else relative.removeprefix("./")
    return "/".join([_PLACEHOLDER, *([_RUN_ID] if per_run else []), relative])


def _input_paths(inputs: Iterable[str], governing: _Governing, redirected: set[str]) -> list[str]:
    """The local paths of the pipelines' inputs whose entries the overlay redirects."""
    paths: set[str] = set()
    for dataset in inputs:
        key = governing.key(dataset)
        if key is None or key not in redirected:
            continue
        path = _get(governing.resolved(dataset), _path_location(governing.resolved(dataset)))
        if isinstance(path, str):
            paths.add(posixpath.normpath(path.removeprefix("file://")))
    return sorted(paths)


# --- writing -------------------------------------------------------------------------------

#: How the overlay's second line starts (:func:`_render`): how an env written here is told.
_WRITTEN_BY = "# Written by `init --cloud-env "


def overlay_envs(conf: Path, base_env: str = "base") -> list[str]:
    """The env folders under ``conf`` that may be a cloud env: neither the base env nor the
    laptop's (the names :func:`check_env_name` refuses), nor hidden; sorted."""
    return sorted(path.name for path in conf.glob("*") if path.is_dir() and not path.name.startswith(".")
                  and path.name not in (base_env, _LAPTOP_ENV))


def written_cloud_envs(conf: Path) -> list[str]:
    """The envs under ``conf`` whose catalog this module wrote (by its header), sorted."""
    found = []
    for catalog in sorted(conf.glob(f"*/{CATALOG_FILE}")):
        try:
            with catalog.open(encoding="utf-8") as file:
                head = [file.readline() for _ in range(2)]
        except (OSError, UnicodeDecodeError):
            continue
        if head[1].startswith(_WRITTEN_BY):
            found.append(catalog.parent.name)
    return found



def _render(name: str, base_env: str, entries: Mapping[str, Any], left_out: list[LeftOut], inputs: list[str],
            root: str | None, per_run: bool) -> str:
    header = [
        f"# Kedro environment '{name}': the datasets of conf/{base_env} on local paths, under the run's storage root.",
        f"{_WRITTEN_BY}{name}`{' --per-run' if per_run else ''} (kvx-runtime); yours to review "
        "and edit: nothing rewrites it at run time.",
        "#",
        "# Why: every pipeline step runs on a machine of its own, so a file one step writes to data/... is not on",
        "# the disk of the step that reads it (and is lost with the machine). Here each such entry has the same",
        f"# relative path under {_PLACEHOLDER}, which kvx-runtime fills with the step's storage root",
        "# (--storage-root, else run_config.root): the same file serves run-local, a test root and the cloud.",
        f"# Outside a step (`kedro run --env {name}`) {_PLACEHOLDER} is KEDRO_CONFIG_STORAGE_ROOT, else",
        "# run_config.root, and needs kvx-runtime's config loader in settings.py (docs/configuration.md).",
    ]
    if per_run:
        header += [f"# With --per-run what the pipelines write is under {_PLACEHOLDER}/{_RUN_ID}/ (one folder per "
                   "run); their inputs stay shared."]
    header += [
        "#",
        f"# Review: Kedro replaces an entry of conf/{base_env} wholesale with the entry of the same name here,",
        "# so each entry is a copy of the base one with only its path changed. A later change to an entry of",
        f"# conf/{base_env} belongs here too (or rerun `init --cloud-env {name} --force`). Compile with --env {name}.",
    ]
    if inputs:
        header += ["#", f"# Copy the pipelines' inputs to the storage root ({root or 'run_config.root'}) before the "
                        "first run:"]
        header += [f"#   {path} -> {_PLACEHOLDER}/{path}" for path in inputs]
    if left_out:
        header += ["#", "# Left as they are (not in this file):"]
        header += [f"#   {item.name}: {item.reason}" for item in left_out]
    blocks = [yaml.safe_dump({key: value}, sort_keys=False, default_flow_style=False, allow_unicode=True,
                             width=10_000).rstrip("\n") for key, value in entries.items()]
    return "\n".join(header) + "\n\n" + "\n\n".join(blocks) + "\n"
