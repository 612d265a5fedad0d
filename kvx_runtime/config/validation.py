"""Checking a raw ``vertexai.yml`` mapping against the schema, leniently.

- unknown keys produce one warning listing every one of them (with a close match if any);
- a wrong type or value is a :class:`~kvx_runtime.errors.ConfigError` naming the key path,
  e.g. ``run_config.resources.fit.cpu: ...`` (exit code 2);
- a command validates strictly only the keys it needs (``needed``): a step does not need
  ``image`` or ``resources``, so a problem there is a warning for a step and an error for
  the compiler.

Placeholders (``${commit_id}``, ``${globals:...}``) are resolved per value by the reader
(:mod:`kvx_runtime.config.files`); one that cannot be resolved arrives here as
:class:`Unresolved` and only matters if that value is needed.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ValidationError

from kvx_runtime.config.schema import PluginConfig
from kvx_runtime.errors import ConfigError
from kvx_runtime.log import get_logger

__all__ = ["ALL_KEYS", "MAX_DEPTH", "STEP_KEYS", "Unresolved", "describe_validation_error", "nesting_depth",
           "parse_plugin_config", "unknown_keys"]

# The package's logger: its lines keep the name they had before config.py became a package.
log = get_logger(__package__)


#: What a step (exec-node, mlflow-start/end) needs; everything else only warns there.
STEP_KEYS: tuple[str, ...] = (
    "run_config.root",
    "run_config.dynamic_config_providers",
    "run_config.mlflow",
    "run_config.s3",
    "run_config.cache",
)
#: Everything (compile, doctor).
ALL_KEYS: tuple[str, ...] = ("",)


@dataclass(frozen=True)
class Unresolved:
    """A value whose placeholder could not be resolved; an error only where it is needed."""

    reason: str


@dataclass
class _Problems:
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def _path(loc: Iterable[Any]) -> str:
    return ".".join(str(part) for part in loc)


def _is_needed(path: str, needed: Iterable[str]) -> bool:
    return any(
        key == "" or path == key or path.startswith(key + ".") or key.startswith(path + ".")
        for key in needed
    )


def unknown_keys(model: BaseModel, prefix: str = "") -> list[str]:
    """The keys of ``model`` (a config section, read with its unknown keys kept) that no schema
    knows, each with a close match when there is one (``run_config.dag_idd (did you mean
    run_config.dag_id?)``); the plugin family's accepted keys are not among them."""
    found: list[str] = []
    _collect_unknown(model, prefix, found, {})
    return found


def _collect_unknown(model: BaseModel, prefix: str, found: list[str], unused: dict[str, str]) -> None:
    known = list(type(model).model_fields)
    accepted: dict[str, str] = getattr(type(model), "ACCEPTED_UNUSED", {})
    for key in model.model_extra or {}:
        path = f"{prefix}{key}"
        if key in accepted:
            unused[path] = accepted[key]
            continue
        close = difflib.get_close_matches(str(key), known, n=1)
        found.append(f"{path} (did you mean {prefix}{close[0]}?)" if close else path)
    for name in known:
        value = getattr(model, name)
        _collect_unknown_in(value, f"{prefix}{name}.", found, unused)


def _collect_unknown_in(value: Any, prefix: str, found: list[str], unused: dict[str, str]) -> None:
    if isinstance(value, BaseModel):
        _collect_unknown(value, prefix, found, unused)
    elif isinstance(value, Mapping):
        for key, item in value.items():
            _collect_unknown_in(item, f"{prefix}{key}.", found, unused)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _collect_unknown_in(item, f"{prefix}{index}.", found, unused)


def _drop(raw: dict[str, Any], loc: tuple[Any, ...]) -> None:
    """Remove the top-most section of ``loc`` below ``run_config`` so defaults apply instead."""
    target: Any = raw
    keep = loc[:2] if loc and loc[0] == "run_config" else loc[:1]
    for part in keep[:-1]:
        target = target.get(part) if isinstance(target, dict) else None
        if target is None:
            return
    if isinstance(target, dict):
        target.pop(keep[-1], None)


def _replace_unresolved(value: Any, path: str, problems: dict[str, str]) -> Any:
    """Record unresolved placeholders by key path and return ``value`` without them."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            child = f"{path}.{key}" if path else str(key)
            if isinstance(item, Unresolved):
                problems[child] = item.reason
            else:
                out[key] = _replace_unresolved(item, child, problems)
        return out
    if isinstance(value, list):
        items = []
        for index, item in enumerate(value):
            if isinstance(item, Unresolved):
                problems[f"{path}.{index}"] = item.reason
            else:
                items.append(_replace_unresolved(item, f"{path}.{index}", problems))
        return items
    return value


def parse_plugin_config(
    raw: Mapping[str, Any] | None,
    *,
    needed: Iterable[str] = ALL_KEYS,
    source: str = "vertexai.yml",
    schema: type[PluginConfig] = PluginConfig,
) -> PluginConfig:
    """Validate a raw ``vertexai.yml`` mapping.

    Raises :class:`ConfigError` (one message listing every problem with its key path) for
    problems in ``needed`` keys; problems elsewhere are logged as one warning and the
    offending section falls back to its defaults. ``schema``: the target's file
    (:class:`~kvx_runtime.config.airflow.AirflowPluginConfig` for ``airflow-k8s.yml``).
    """
    needed = tuple(needed)
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(raw).__name__}")

    unresolved: dict[str, str] = {}
    data = _replace_unresolved(dict(raw), "", unresolved)
    problems = _Problems()
    for path, reason in unresolved.items():
        target = problems.errors if _is_needed(path, needed) else problems.warnings
        target.append(f"{path}: {reason}")

    config: PluginConfig | None = None
    for _ in range(8):  # each round drops the sections that are not needed and failed
        try:
            config = schema.model_validate(data)
            break
        except ValidationError as exc:
            dropped = False
            for error in exc.errors(include_url=False):
                loc = tuple(error["loc"])
                message = f"{_path(loc)}: {_describe(error)}"
                if _is_needed(_path(loc), needed):
                    problems.errors.append(message)
                else:
                    problems.warnings.append(message)
                    _drop(data, loc)
                    dropped = True
            if problems.errors or not dropped:
                break
    if problems.errors:
        raise ConfigError(f"{source}: " + "; ".join(dict.fromkeys(problems.errors)))
    if config is None:  # pragma: no cover - only if dropping never converges
        raise ConfigError(f"{source}: " + "; ".join(problems.warnings))
    if problems.warnings:
        log.warning(
            f"{source}: values not needed by this command are invalid and were ignored",
            problems=list(dict.fromkeys(problems.warnings)),
            source=source,
        )
    unknown: list[str] = []
    unused: dict[str, str] = {}
    _collect_unknown(config, "", unknown, unused)
    for path, why in unused.items():
        log.warning(f"{path} is ignored: {why}", source=source)
    if unknown:
        log.warning(f"unknown keys in {source} are ignored", keys=unknown, source=source)
    return config


def describe_validation_error(exc: ValidationError, prefix: str = "") -> str:
    """Each problem of ``exc`` as ``<prefix><key>: <what is wrong>``, in one line."""
    return "; ".join(dict.fromkeys(f"{prefix}{_path(error['loc'])}: {_describe(error)}"
                                   for error in exc.errors(include_url=False)))


def _describe(error: Mapping[str, Any]) -> str:
    kind = error.get("type", "")
    value = error.get("input")
    if kind == "missing":
        return "required key is missing"
    if kind in {"dict_type", "model_type", "model_attributes_type"}:
        return f"expected a mapping, got {type(value).__name__} {value!r}"
    if kind == "list_type":
        return f"expected a list, got {type(value).__name__} {value!r}"
    message = str(error.get("msg", "invalid value")).removeprefix("Value error, ")
    if kind.endswith("_type") or kind.endswith("_parsing") or kind == "literal_error":
        return f"{message} (got {value!r})"
    return message


#: Deeper than any real configuration; deeper input is refused before anything recurses on it.
MAX_DEPTH = 64


def nesting_depth(value: Any) -> int:
    """How deeply ``value`` nests mappings and lists (iteratively: no recursion limit; counting
    stops once past :data:`MAX_DEPTH`). Used for config files and ``--param`` JSON alike."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        current, level = stack.pop()
        deepest = max(deepest, level)
        if level > MAX_DEPTH:
            break
        if isinstance(current, Mapping):
            stack.extend((item, level + 1) for item in current.values())
        elif isinstance(current, list):
            stack.extend((item, level + 1) for item in current)
    return deepest
