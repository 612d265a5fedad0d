"""``--param key=value`` parsing into Kedro runtime params.

Values are typed the way a user would expect on a command line: ``3`` is an int, ``0.5`` a
float, ``true``/``false`` a bool, ``null`` None, ``[...]``/``{...}`` JSON; everything else a
string. Dotted keys build nested mappings (``model.lr=0.1`` -> ``{"model": {"lr": 0.1}}``),
which Kedro merges over the nested parameters as its own ``--params`` does.

A key may carry its type, ``key:int=10.0``, which the compiler always emits: pipeline
parameters reach the step as text (an integer may arrive as ``10.0``), and the declared type
is what makes it an int again. Types: str, int, float, bool, list, dict.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import Any

from kvx_runtime.dynamic_config import deep_merge
from kvx_runtime.errors import UsageError

__all__ = ["parse_param_value", "parse_params"]

_INT = re.compile(r"^[+-]?\d+$")
_FLOAT = re.compile(r"^[+-]?(\d+\.\d*|\.\d+|\d+)([eE][+-]?\d+)?$|^[+-]?(inf|nan)$", re.IGNORECASE)
_KEY = re.compile(r"^[A-Za-z_][\w\-]*(\.[A-Za-z_0-9][\w\-]*)*$")
_TRUE, _FALSE = {"true", "1", "yes"}, {"false", "0", "no"}
_MAX_KEY_PARTS = 32


def _as_int(text: str) -> int:
    number = float(text)
    if not number.is_integer():
        raise ValueError(f"{text!r} is not a whole number")
    return int(number)


def _as_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in _TRUE | _FALSE:
        return lowered in _TRUE
    raise ValueError(f"{text!r} is not true or false")


def _json(text: str) -> Any:
    """JSON no deeper than any configuration (deeper input would exhaust the stack later)."""
    from kvx_runtime.config import MAX_DEPTH, _depth

    try:
        value = json.loads(text)
    except RecursionError:
        raise ValueError(f"JSON nested more than {MAX_DEPTH} levels deep") from None
    if _depth(value) > MAX_DEPTH:
        raise ValueError(f"JSON nested more than {MAX_DEPTH} levels deep")
    return value


def _as_json(kind: type) -> Any:
    def convert(text: str) -> Any:
        value = _json(text)
        if not isinstance(value, kind):
            raise ValueError(f"{_shown(text)} is not a JSON {kind.__name__}")
        return value

    return convert


def _shown(text: str) -> str:
    return repr(text if len(text) <= 80 else text[:77] + "...")


_TYPED = {
    "str": str,
    "int": _as_int,
    "float": float,
    "bool": _as_bool,
    "list": _as_json(list),
    "dict": _as_json(dict),
}


def parse_param_value(text: str) -> Any:
    """Type one command-line value (see the module docstring)."""
    stripped = text.strip()
    lowered = stripped.lower()
    if lowered in {"true", "false"}:
        return lowered == "true"
    if lowered in {"null", "none"}:
        return None
    if _INT.match(stripped):
        return int(stripped)
    if _FLOAT.match(stripped):
        return float(stripped)
    if stripped[:1] in {"[", "{"}:
        try:
            return _json(stripped)
        except ValueError as exc:  # json.JSONDecodeError is a ValueError
            raise UsageError(f"--param value {_shown(text)} looks like JSON but is invalid: {exc}") from None
    return text


def parse_params(items: Iterable[str]) -> dict[str, Any]:
    """``["a.b=1", "c=x"]`` -> ``{"a": {"b": 1}, "c": "x"}``; later items win."""
    result: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key, _, kind = key.strip().partition(":")
        if not sep or not key:
            raise UsageError(f"--param {item!r} must look like key=value")
        if not _KEY.match(key):
            raise UsageError(f"--param key {_shown(key)} is not a parameter name (letters, digits, _ and dots)")
        if key.count(".") >= _MAX_KEY_PARTS:
            raise UsageError(f"--param key {_shown(key)} has more than {_MAX_KEY_PARTS} dotted parts")
        value: Any
        if kind:
            if kind not in _TYPED:
                raise UsageError(f"--param {key}: unknown type {_shown(kind)} (use {', '.join(_TYPED)})")
            try:
                value = _TYPED[kind](raw)
            except ValueError as exc:
                raise UsageError(f"--param {key}: {exc}") from None
        else:
            value = parse_param_value(raw)
        for part in reversed(key.split(".")):
            value = {part: value}
        result = deep_merge(result, value)
    return result
