"""Dynamic config providers: config files generated inside the step, before Kedro reads config.

A provider is named in ``vertexai.yml``::

    run_config:
      dynamic_config_providers:
        - cls: my_project.auth.VaultCredentialsProvider
          params: {role: trainer}

Each provider is built as ``cls(config, **params)`` and writes ``generate_config()`` into
``conf/<target_env>/<target_config_file>`` (``credentials.yml`` usually), deep-merged with
what is there (``merge_with_existing``). The file is replaced atomically and has mode 0600.
Values are never logged: only the file and its top-level keys.
"""

from __future__ import annotations

import importlib
import os
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from kvx_runtime.errors import ConfigError, KvxError
from kvx_runtime.log import get_logger, register_secrets

if TYPE_CHECKING:
    from kvx_runtime.config import DynamicConfigProviderSpec, PluginConfig

__all__ = ["DynamicConfigProvider", "deep_merge", "import_object", "materialize_dynamic_config"]

log = get_logger(__name__)

#: Class paths of the kedro-vertexai family, mapped to ours so existing configs keep working.
_ALIASES = {
    "kedro_vertexai.auth.gcp.MLFlowGoogleOAuthCredentialsProvider": (
        "kvx_runtime.auth.gcp.MLFlowGoogleOAuthCredentialsProvider"
    ),
    "kedro_vertexai.auth.gcp.MLFlowGoogleIAMCredentialsProvider": (
        "kvx_runtime.auth.gcp.MLFlowGoogleIAMCredentialsProvider"
    ),
}


def deep_merge(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """Merge ``update`` into a copy of ``base``; nested mappings merge, other values replace."""
    merged: dict[str, Any] = dict(base)
    for key, value in update.items():
        current = merged.get(key)
        if isinstance(current, Mapping) and isinstance(value, Mapping):
            merged[key] = deep_merge(current, value)
        else:
            merged[key] = value
    return merged


class DynamicConfigProvider(ABC):
    """Generates one config file inside the step. Subclass it and name it in ``vertexai.yml``.

    ``self.config`` is the validated plugin config; ``self.params`` the ``params`` mapping.
    """

    def __init__(self, config: PluginConfig, **params: Any) -> None:
        self.config = config
        self.params = params
        self._run_env = "local"

    @property
    def target_env(self) -> str:
        """The config environment to write into; by default the environment the step runs."""
        return self._run_env

    @property
    @abstractmethod
    def target_config_file(self) -> str:
        """File name inside ``conf/<target_env>/``, e.g. ``credentials.yml``."""

    @abstractmethod
    def generate_config(self) -> dict[str, Any]:
        """The content to write (merged with the existing file)."""

    def merge_with_existing(
        self, existing_config: dict[str, Any], generated_config: dict[str, Any]
    ) -> dict[str, Any]:
        """Deep merge: generated values win, everything else in the file is kept."""
        return deep_merge(existing_config, generated_config)


def import_object(path: str, *, what: str) -> Any:
    """Import ``package.module.Name``; a clear :class:`ConfigError` if that is impossible."""
    module_name, _, attribute = path.rpartition(".")
    if not module_name:
        raise ConfigError(f"{what}: {path!r} is not a fully qualified name (module.Class)")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"{what}: cannot import module {module_name!r} ({exc})") from None
    try:
        return getattr(module, attribute)
    except AttributeError:
        raise ConfigError(f"{what}: module {module_name!r} has no {attribute!r}") from None


def build_provider(
    spec: DynamicConfigProviderSpec, config: PluginConfig, run_env: str, index: int
) -> DynamicConfigProvider:
    what = f"run_config.dynamic_config_providers.{index}.cls"
    cls = import_object(_ALIASES.get(spec.cls, spec.cls), what=what)
    if not (isinstance(cls, type) and issubclass(cls, DynamicConfigProvider)):
        raise ConfigError(
            f"{what}: {spec.cls} is not a subclass of "
            "kvx_runtime.dynamic_config.DynamicConfigProvider"
        )
    try:
        provider = cls(config, **spec.params)
    except TypeError as exc:
        raise ConfigError(f"run_config.dynamic_config_providers.{index}.params: {exc}") from None
    provider._run_env = run_env
    return provider


def _write_private_yaml(path: Path, content: Mapping[str, Any]) -> None:
    """Replace ``path`` atomically with ``content`` as YAML, readable by the owner only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(descriptor, 0o600)
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            yaml.safe_dump(dict(content), handle, sort_keys=False, default_flow_style=False)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _read_existing(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    from kvx_runtime.config.yaml_text import load_yaml

    loaded = load_yaml(path.read_text(encoding="utf-8"), str(path))
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: existing file must hold a mapping to merge into")
    return loaded


def materialize_dynamic_config(
    config: PluginConfig, conf_root: Path, run_env: str
) -> list[Path]:
    """Run every configured provider in order; return the files written."""
    written: list[Path] = []
    if config.run_config.dynamic_config_providers and not conf_root.is_dir():
        raise ConfigError(f"dynamic config providers write into the configuration folder, and {conf_root} "
                          "(CONF_SOURCE) is not a folder",
                          hint="keep the configuration as a folder of the project in the image")
    for index, spec in enumerate(config.run_config.dynamic_config_providers):
        # Parameters may carry secrets, and an exception's text may quote them.
        register_secrets([spec.params])
        provider = build_provider(spec, config, run_env, index)
        name = type(provider).__name__
        try:
            generated = provider.generate_config()
        except KvxError:
            raise
        except Exception as exc:
            raise ConfigError(
                f"dynamic config provider {spec.cls} failed: {type(exc).__name__}: {exc}"
            ) from exc
        if not isinstance(generated, Mapping):
            raise ConfigError(f"dynamic config provider {spec.cls} must return a mapping")
        register_secrets([generated])
        target = conf_root / provider.target_env / provider.target_config_file
        if conf_root.resolve() not in target.resolve().parents:
            raise ConfigError(f"dynamic config provider {spec.cls}: {target} is outside {conf_root}")
        try:
            _write_private_yaml(target, provider.merge_with_existing(_read_existing(target), dict(generated)))
        except yaml.YAMLError as exc:  # the message may quote a value: only the kind of value is said
            problem = getattr(exc, "problem", None) or type(exc).__name__
            raise ConfigError(f"dynamic config provider {spec.cls}: what it returned cannot be written as "
                              f"YAML to {target} ({problem})",
                              hint="return plain values: strings, numbers, booleans, lists and mappings") from None
        except OSError as exc:
            raise ConfigError(f"dynamic config provider {spec.cls}: cannot write {target}: "
                              f"{exc.strerror or type(exc).__name__}",
                              hint="the configuration folder must be writable in the step's image "
                                   "(not a read-only mount)") from None
        log.info(
            "dynamic config written",
            provider=name,
            path=str(target),
            keys=sorted(str(key) for key in generated),
        )
        written.append(target)
    return written
