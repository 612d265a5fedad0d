"""EnvTemplatedConfigLoader: ``${name}`` and ``${name|default}`` from ``KEDRO_CONFIG_<NAME>``.

Kedro projects written for the kedro-vertexai family put placeholders such as ``${run_id}`` or
``${commit_id|dirty}`` in their catalog and parameters. This loader fills them from environment
variables while keeping everything Kedro's own ``OmegaConfigLoader`` does: ``${globals:...}``,
``${runtime_params:...}``, ``${oc.env:...}`` in credentials, custom resolvers and plain OmegaConf
interpolations between keys.

How it works: when a config file is read, each placeholder that belongs to us is rewritten into
a call of the ``kvx_template`` resolver (the file text never receives the raw value, so a value
with YAML syntax in it cannot corrupt the file). A placeholder belongs to us when it has a
default, when its ``KEDRO_CONFIG_<NAME>`` variable is set, or when it is one of the names always
defined during a step (``run_id``, ``job_name``). A bare ``${name}`` that is none of these is
left to OmegaConf, since it may point at another key; if OmegaConf cannot resolve it either, the
error names the placeholder, the file(s) it appears in and the variable to set.

``${storage_root}`` (what a cloud env's catalog puts local datasets under) is defined in a step
(``exec-node`` exports the step's storage root) and while ``compile`` loads the catalog; anywhere
else it falls back to the env's ``run_config.root``, and without one it is undefined: never a
local directory (:mod:`kvx_runtime.config.storage_root` says why).

A project can name the class in its ``settings.py``::

    from kvx_runtime.config_loader import EnvTemplatedConfigLoader
    CONFIG_LOADER_CLASS = EnvTemplatedConfigLoader
"""

from __future__ import annotations

import io
import os
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from kedro.config import OmegaConfigLoader
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from kvx_runtime.errors import ConfigError

__all__ = [
    "CONFIG_SUFFIXES",
    "DISABLE_ENV_VAR",
    "ENV_PREFIX",
    "STORAGE_ROOT_PLACEHOLDER",
    "EnvTemplatedConfigLoader",
    "EnvTemplatingMixin",
    "env_var_name",
    "exported_storage_root",
    "render_templates",
    "run_identity_values",
]

ENV_PREFIX = "KEDRO_CONFIG_"
DISABLE_ENV_VAR = "KEDRO_VERTEXAI_DISABLE_CONFIG_HOOK"
DISABLED_WARNING = (
    f"{DISABLE_ENV_VAR} environment variable is set and EnvTemplatedConfigLoader will not be "
    "used which means formatted config values like ${run_id} will not be substituted at runtime"
)
#: Names that always have a value, even outside a step (then a generated local id).
ALWAYS_DEFINED = ("run_id", "job_name")
#: The run's storage root (what it means where: :mod:`kvx_runtime.config.storage_root`).
STORAGE_ROOT_PLACEHOLDER = "storage_root"
_RESOLVER = "kvx_template"
#: What Kedro reads as a config file (the rest of a conf folder is not config).
CONFIG_SUFFIXES = (".yml", ".yaml", ".json")
# ${name} or ${name|default}; a backslash before "$" escapes it, as in OmegaConf.
_PLACEHOLDER = re.compile(r"(?<!\\)\$\{([A-Za-z_][A-Za-z0-9_]*)(?:\|([^}]*))?\}")
_MISSING_KEY = re.compile(r"Interpolation key '([A-Za-z_][A-Za-z0-9_]*)' not found")


def env_var_name(name: str) -> str:
    """``commit_id`` -> ``KEDRO_CONFIG_COMMIT_ID``."""
    return ENV_PREFIX + name.upper()


class _TemplateRegistry:
    """Process-wide table of placeholders seen in config files, indexed for the resolver.

    The resolver receives only an integer, so defaults may contain any character (``:``,
    quotes, ``,``) without OmegaConf grammar escaping. Entries are deduplicated, so repeated
    loads do not grow the table.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: list[tuple[str, str | None, str]] = []
        self._index: dict[tuple[str, str | None, str], int] = {}
        #: Bare placeholders left to OmegaConf: name -> files, for error messages.
        self.unclaimed: dict[str, set[str]] = {}
        self._local_id: str | None = None

    def claim(self, name: str, default: str | None, source: str) -> int:
        key = (name, default, source)
        with self._lock:
            if key not in self._index:
                self._index[key] = len(self._entries)
                self._entries.append(key)
            return self._index[key]

    def leave(self, name: str, source: str) -> None:
        with self._lock:
            self.unclaimed.setdefault(name, set()).add(source)

    def local_id(self) -> str:
        """A run id for runs outside a step (plain ``kedro run``): stable per process."""
        with self._lock:
            if self._local_id is None:
                stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
                self._local_id = f"local-{stamp}-{uuid.uuid4().hex[:6]}"
            return self._local_id

    def resolve(self, index: int) -> str:
        try:
            name, default, source = self._entries[int(index)]
        except (IndexError, ValueError) as exc:  # pragma: no cover - only on misuse
            raise ConfigError(f"unknown config template reference {index!r}") from exc
        value = os.environ.get(env_var_name(name))
        if value is not None:
            return value
        if default is not None:
            return default
        if name in ALWAYS_DEFINED:
            return self.local_id()
        raise ConfigError(  # pragma: no cover - claim() only claims resolvable names
            f"${{{name}}} in {source} is not defined: set {env_var_name(name)}"
        )


_REGISTRY = _TemplateRegistry()


def run_identity_values() -> tuple[str, ...]:
    """What ``${run_id}`` and ``${job_name}`` stand for in this process's config: a config
    value holding one of them names this run, and is another value in each run."""
    values = {os.environ.get(env_var_name(name)) for name in ALWAYS_DEFINED}
    return tuple(sorted(value for value in values | {_REGISTRY.local_id()} if value))


def _ensure_resolver() -> None:
    if OmegaConf.has_resolver(_RESOLVER):
        return
    # OmegaConf 2.4 renamed register_new_resolver (now deprecated); 2.1-2.3 only have the old one.
    register = getattr(OmegaConf, "register_resolver", None) or OmegaConf.register_new_resolver
    register(_RESOLVER, _REGISTRY.resolve, use_cache=False)


def render_templates(text: str, source: str, configured_root: Callable[[], str | None] | None = None) -> str:
    """Rewrite our placeholders in one config file's text into ``kvx_template`` calls.

    ``source`` (the file path) is kept for error messages; ``configured_root`` gives
    ``${storage_root}``'s value where no step or command exported one (``run_config.root``),
    asked only when the file uses it.
    """
    _ensure_resolver()

    def replace(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        if default is not None or env_var_name(name) in os.environ or name in ALWAYS_DEFINED:
            return "${%s:%d}" % (_RESOLVER, _REGISTRY.claim(name, default, source))
        if name == STORAGE_ROOT_PLACEHOLDER and configured_root is not None:
            root = configured_root()
            if root is not None:  # the variable, when set later, still wins
                return "${%s:%d}" % (_RESOLVER, _REGISTRY.claim(name, root, source))
        _REGISTRY.leave(name, source)
        return match.group(0)

    # A placeholder ends with "}": none lies past the last one. Scanning there would be
    # quadratic, each "${x|" rescanning to the end of the text for a "}" that is not there.
    end = text.rfind("}") + 1
    return _PLACEHOLDER.sub(replace, text[:end]) + text[end:]


def explain_interpolation_error(exc: OmegaConfBaseException) -> ConfigError | None:
    """Turn OmegaConf's "Interpolation key 'x' not found" for one of our names into a clear error."""
    match = _MISSING_KEY.search(str(exc))
    if not match:
        return None
    name = match.group(1)
    files = sorted(_REGISTRY.unclaimed.get(name, ()))
    if not files:
        return None
    hint = f"set {env_var_name(name)} or write a default: ${{{name}|value}}"
    if name == STORAGE_ROOT_PLACEHOLDER:
        hint = (f"a step sets it from its --storage-root, else run_config.root; elsewhere set run_config.root "
                f"in vertexai.yml or {env_var_name(name)}")
    return ConfigError(f"config placeholder ${{{name}}} in {', '.join(files)} is not defined", hint=hint)


@contextmanager
def exported_storage_root(root: str | None) -> Iterator[None]:
    """``${storage_root}`` is ``root`` inside the block (a command loading the catalog for its
    run's root, as a step does); the variable's earlier value is restored after it."""
    if root is None:
        yield
        return
    from kvx_runtime.settings import environment_variable

    with environment_variable(env_var_name(STORAGE_ROOT_PLACEHOLDER), root):
        yield


_UNREAD = object()


class _TemplatingFile(io.BytesIO):
    """What the loader's ``fs.open`` returns: the rendered bytes, usable as a context manager."""


class _TemplatingFileSystem:
    """Wraps the loader's fsspec filesystem so every config file read is rendered first.

    Everything except ``open`` (glob, isdir, ls...) goes to the wrapped filesystem unchanged.
    """

    def __init__(self, fs: Any, configured_root: Callable[[], str | None] | None = None) -> None:
        self._fs = fs
        self._configured_root = configured_root

    def __getattr__(self, name: str) -> Any:
        return getattr(self._fs, name)

    def open(self, path: str, mode: str = "rb", *args: Any, **kwargs: Any) -> Any:
        handle = self._fs.open(path, mode, *args, **kwargs)
        if "r" not in mode or not str(path).endswith(CONFIG_SUFFIXES):
            return handle
        with handle:
            raw = handle.read()
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        return _TemplatingFile(render_templates(text, str(path), self._configured_root).encode("utf-8"))


class EnvTemplatingMixin:
    """Adds ``KEDRO_CONFIG_*`` templating to an ``OmegaConfigLoader`` (sub)class.

    Kept as a mixin so that a project with its own ``OmegaConfigLoader`` subclass keeps it:
    the executor composes ``(EnvTemplatingMixin, TheirLoader)`` instead of replacing it.
    """

    _kvx_configured_root: Any = _UNREAD

    def _initialise_filesystem_and_protocol(self, conf_source: str) -> tuple[Any, str]:
        fs, protocol = super()._initialise_filesystem_and_protocol(conf_source)  # type: ignore[misc]
        _ensure_resolver()
        return _TemplatingFileSystem(fs, self._configured_storage_root), protocol

    def _configured_storage_root(self) -> str | None:
        """This loader's env's ``run_config.root`` (read once, when a file uses ``${storage_root}``
        and no step or command exported one)."""
        if self._kvx_configured_root is _UNREAD:
            loader: Any = self  # a mixin: the loader class gives these attributes
            env = loader.env or loader.default_run_env or loader.base_env
            merge_strategy = (getattr(loader, "merge_strategy", None) or {}).get("vertexai", "destructive")
            # Here, not at the top: plain `kedro run` imports this module from settings.py.
            from kvx_runtime.config.storage_root import configured_storage_root

            try:
                self._kvx_configured_root = configured_storage_root(loader.conf_source, env, loader.base_env,
                                                                    merge_strategy)
            except ConfigError:
                raise  # a broken vertexai.yml says so
            except Exception:  # configuration that is not a folder (an archive): no root known
                self._kvx_configured_root = None
        return self._kvx_configured_root

    def __getitem__(self, key: str) -> dict[str, Any]:
        try:
            return super().__getitem__(key)  # type: ignore[misc]  # a mixin: the loader class is the base
        except OmegaConfBaseException as exc:
            explained = explain_interpolation_error(exc)
            if explained is not None:
                raise explained from exc
            raise


class EnvTemplatedConfigLoader(EnvTemplatingMixin, OmegaConfigLoader):
    """Kedro's ``OmegaConfigLoader`` plus ``${name}`` / ``${name|default}`` from the environment."""


def with_env_templating(loader_class: type) -> type | None:
    """Return a loader class that adds templating to ``loader_class``, or None if impossible.

    - the stock ``OmegaConfigLoader`` becomes :class:`EnvTemplatedConfigLoader`;
    - a class that already templates is kept as is;
    - another ``OmegaConfigLoader`` subclass gets the mixin composed in front of it;
    - anything else (a loader not built on OmegaConf) cannot be templated: None.
    """
    if issubclass(loader_class, EnvTemplatingMixin):
        return loader_class
    if loader_class is OmegaConfigLoader:
        return EnvTemplatedConfigLoader
    if issubclass(loader_class, OmegaConfigLoader):
        return type(f"EnvTemplated{loader_class.__name__}", (EnvTemplatingMixin, loader_class), {})
    return None
