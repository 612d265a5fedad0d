"""Reading a project's ``vertexai.yml``: finding the files of the base and the run
environment (or a kedro-kubeflow project's ``kubeflow.yml``, a kedro-airflow-k8s project's
``airflow-k8s.yml``), parsing them (YAML errors with the
file's name, line and column: :mod:`kvx_runtime.config.yaml_text`), merging them the way Kedro
merges configuration, then validating the result (:mod:`kvx_runtime.config.validation`). A
missing file means defaults.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path, PurePosixPath
from typing import Any

from kvx_runtime.config.schema import PluginConfig
from kvx_runtime.config.validation import ALL_KEYS, MAX_DEPTH, Unresolved, nesting_depth, parse_plugin_config
from kvx_runtime.errors import ConfigError, KvxError
from kvx_runtime.log import get_logger

__all__ = ["AIRFLOW_CONFIG_PATTERNS", "CONFIG_PATTERNS", "KUBEFLOW_CONFIG_PATTERNS", "files_read_instead",
           "load_plugin_config", "read_raw_plugin_config", "schema_of"]

# The package's logger: its lines keep the name they had before config.py became a package.
log = get_logger(__package__)

#: The plugin's config files in an environment directory.
CONFIG_PATTERNS = ["vertexai*", "vertexai/**"]
#: Read when no vertexai* file exists: projects coming from kedro-kubeflow.
KUBEFLOW_CONFIG_PATTERNS = ["kubeflow*", "kubeflow/**"]
#: Read when neither exists: projects coming from kedro-airflow-k8s (``airflow.yml`` accepted too).
AIRFLOW_CONFIG_PATTERNS = ["airflow-k8s*", "airflow-k8s/**", "airflow.yml", "airflow.yaml"]
#: The families of config files, in the order an environment's files are chosen: the first
#: family with a file there is read, the others' files are ignored with a warning.
_FAMILIES: tuple[tuple[str, list[str]], ...] = (
    ("vertexai", CONFIG_PATTERNS),
    ("kubeflow", KUBEFLOW_CONFIG_PATTERNS),
    ("airflow", AIRFLOW_CONFIG_PATTERNS),
)


def _resolve_leaves(node: Any) -> Any:
    """Resolve an OmegaConf tree value by value; failures become :class:`Unresolved`."""
    from omegaconf import DictConfig, ListConfig, OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(node, DictConfig):
        out: dict[str, Any] = {}
        for key in node:
            try:
                child = node._get_node(key)
                value = node[key] if not OmegaConf.is_config(child) else child
            except OmegaConfBaseException as exc:
                out[str(key)] = Unresolved(_first_line(exc))
                continue
            out[str(key)] = _resolve_leaves(value)
        return out
    if isinstance(node, ListConfig):
        items: list[Any] = []
        for index in range(len(node)):
            try:
                items.append(_resolve_leaves(node[index]))
            except OmegaConfBaseException as exc:
                items.append(Unresolved(_first_line(exc)))
        return items
    return node


def _first_line(exc: BaseException) -> str:
    from kvx_runtime.config_loader import explain_interpolation_error

    explained = explain_interpolation_error(exc)  # type: ignore[arg-type]
    if explained:
        return str(explained)
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def _parse_file(raw: bytes, path: str) -> Any:
    """One config file's text parsed, or a ConfigError saying what is wrong with it."""
    import yaml
    from omegaconf import OmegaConf

    from kvx_runtime.config.yaml_text import describe_yaml_error, load_yaml
    from kvx_runtime.config_loader import render_templates

    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start} is 0x{raw[exc.start]:02x})",
                          hint="save the file as UTF-8") from None
    if not text.strip():
        return None
    data = load_yaml(text, path)  # depth first: OmegaConf recurses without a limit
    if data is None:
        return None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    if nesting_depth(data) > MAX_DEPTH:
        raise ConfigError(f"{path}: nested more than {MAX_DEPTH} levels deep")
    try:
        return OmegaConf.create(render_templates(text, path))
    except KvxError:
        raise
    except yaml.YAMLError as exc:
        raise ConfigError(describe_yaml_error(exc, path)) from None
    except Exception as exc:
        raise ConfigError(f"{path}: not valid YAML: {_first_line(exc)}") from None


def read_raw_plugin_config(
    conf_source: str | Path,
    env: str,
    *,
    base_env: str = "base",
    merge_strategy: str = "destructive",
) -> tuple[dict[str, Any], list[str]]:
    """Read and merge ``vertexai*`` files from ``<conf>/<base_env>`` and ``<conf>/<env>``
    (in an environment without ``vertexai*`` files, its ``kubeflow*`` files: a kedro-kubeflow
    project).

    Returns the merged mapping (values resolved one by one, see :func:`_resolve_leaves`) and
    the files read. ``merge_strategy`` is Kedro's: ``destructive`` (the env file replaces
    top-level keys, Kedro's default) or ``soft`` (deep merge).
    """
    from omegaconf import OmegaConf

    fs, root = conf_filesystem(str(conf_source))
    layers: list[Any] = []
    files: list[str] = []
    envs = [base_env] if env == base_env else [base_env, env]
    for env_name in envs:
        env_dir = str(PurePosixPath(root) / env_name)
        # Per environment: its vertexai* files, else its kubeflow* files (a kedro-kubeflow
        # project), else its airflow ones, so that conf/base/kubeflow.yml and
        # conf/local/vertexai.yml both count.
        present = [(family, files_of) for family, patterns in _FAMILIES
                   if (files_of := _config_files(fs, env_dir, patterns))]
        found = present[0][1] if present else set()
        ignored = sorted(path for _, files_of in present[1:] for path in files_of)
        if ignored:
            log.warning(f"{' and '.join(family for family, _ in present)} config files in one environment: only "
                        f"the {present[0][0]} ones are read", environment=env_name, ignored=ignored)
        configs = []
        for path in sorted(found):
            if fs.isdir(path):
                continue
            loaded = _parse_file(fs.cat_file(path), path)
            if loaded is None:
                continue
            if not OmegaConf.is_dict(loaded):
                raise ConfigError(f"{path}: expected a mapping at the top level")
            configs.append(loaded)
            files.append(path)
        if configs:
            layers.append(_merge(configs, files))
    if not layers:
        return {}, files
    if merge_strategy == "soft" or len(layers) == 1:
        merged = _merge(layers, files)
    else:
        merged = OmegaConf.merge(layers[0])
        for key in layers[1]:
            merged[key] = layers[1]._get_node(key)
    return _resolve_leaves(merged), files


#: The archive types Kedro's config loader reads a ``CONF_SOURCE`` from (by MIME type).
_ARCHIVE_PROTOCOLS = {"application/x-tar": "tar", "application/zip": "zip",
                      "application/x-zip-compressed": "zip", "application/zip-compressed": "zip"}


def _archive_protocol(conf_source: str) -> str | None:
    import mimetypes

    return _ARCHIVE_PROTOCOLS.get(mimetypes.guess_type(conf_source)[0] or "")


def is_conf_archive(conf_source: str) -> bool:
    """Whether Kedro reads ``conf_source`` as a configuration archive (tar or zip)."""
    return _archive_protocol(conf_source) is not None


def conf_files(conf_source: str, pattern: str) -> list[str]:
    """The files matching ``pattern`` (relative to the folder holding the environments, e.g.
    ``base/mlflow*``) in the configuration, wherever it is (:func:`conf_filesystem`)."""
    fs, root = conf_filesystem(conf_source)
    return sorted(fs.glob(f"{root}/{pattern}"))


def conf_filesystem(conf_source: str) -> tuple[Any, str]:
    """The filesystem and the folder holding the environments, as Kedro's config loader reads
    ``conf_source``: a folder (local or remote), or a tar/zip archive (``kedro package``'s
    conf archive), whose environments are in its last top-level entry."""
    import fsspec

    protocol = _archive_protocol(conf_source)
    if protocol is None:
        fs, root = fsspec.core.url_to_fs(conf_source)
        return fs, str(root)
    try:
        fs = fsspec.filesystem(protocol, fo=conf_source)
        entries = fs.ls("", detail=False)
    except Exception as exc:
        raise ConfigError(f"the configuration archive {conf_source} cannot be read: {type(exc).__name__}: "
                          f"{_first_line(exc)}") from None
    if not entries:
        raise ConfigError(f"the configuration archive {conf_source} is empty")
    return fs, str(PurePosixPath(entries[-1]))


def files_read_instead(env_dir: str | Path, family: str) -> list[str]:
    """The config files in ``env_dir`` of a family read before ``family`` (``vertexai``,
    ``kubeflow``, ``airflow``): while one exists, a file of ``family`` there is ignored."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(str(env_dir))
    names = [name for name, _ in _FAMILIES]
    earlier = _FAMILIES[:names.index(family)]
    return sorted(PurePosixPath(path).name for _, patterns in earlier for path in _config_files(fs, root, patterns))


def _config_files(fs: Any, env_dir: str, patterns: Iterable[str]) -> set[str]:
    """The paths in ``env_dir`` matching ``patterns`` with a config file's suffix (a stray
    ``vertexai.yml.bak`` chooses nothing)."""
    from kvx_runtime.config_loader import CONFIG_SUFFIXES

    return {path for pattern in patterns for path in fs.glob(f"{env_dir}/{pattern}")
            if path.endswith(CONFIG_SUFFIXES)}


def _merge(configs: list[Any], files: list[str]) -> Any:
    from omegaconf import OmegaConf

    try:
        return OmegaConf.merge(*configs)
    except Exception as exc:  # e.g. a mapping in one file, a list in another
        raise ConfigError(f"{', '.join(files)}: the files cannot be merged: {_first_line(exc)}") from None


def schema_of(files: Iterable[str]) -> type[PluginConfig]:
    """The schema of the config ``files`` read: ``airflow-k8s.yml``'s when one of them is an
    Airflow file (its keys are a superset of the others'), else ``vertexai.yml``'s."""
    from kvx_runtime.config.airflow import AirflowPluginConfig

    names = [PurePosixPath(path) for path in files]
    airflow = any(name.match(pattern) or any(parent.match(pattern.removesuffix("/**")) for parent in name.parents)
                  for name in names for pattern in AIRFLOW_CONFIG_PATTERNS)
    return AirflowPluginConfig if airflow else PluginConfig


def load_plugin_config(
    conf_source: str | Path,
    env: str,
    *,
    base_env: str = "base",
    merge_strategy: str = "destructive",
    needed: Iterable[str] = ALL_KEYS,
) -> PluginConfig:
    """Read, merge and validate ``vertexai.yml`` for ``env``. A missing file means defaults."""
    raw, files = read_raw_plugin_config(
        conf_source, env, base_env=base_env, merge_strategy=merge_strategy
    )
    source = ", ".join(files) if files else f"{conf_source}/{{{base_env},{env}}}/vertexai.yml"
    return parse_plugin_config(raw, needed=needed, source=source, schema=schema_of(files))
