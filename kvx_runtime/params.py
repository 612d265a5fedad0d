"""Parameter typing, in one table, and ``--param key=value`` parsing into Kedro runtime params.

The kinds of a parameter are str, int, float, bool, list and dict; each has one converter from
text (:func:`convert`), used by every command that takes a parameter on its command line:

* ``str``: the text as is;
* ``int``: a whole number (``10.0`` is 10: pipelines deliver integers as text like that);
* ``float``: a number;
* ``bool``: ``true`` or ``false``, in any case (``yes``, ``1``, ``no``, ``0`` are refused);
* ``list`` / ``dict``: JSON of that kind, no deeper than any configuration.

A Kedro value's kind is :func:`kind_of`; :func:`fits` says whether a Kedro value fits a kind (an
int fits float). Pipeline spec types (``NUMBER_INTEGER``, ``BOOLEAN``, ...) map onto the kinds
(:data:`SPEC_TYPES`).

``exec-node --param`` and ``run-once --param`` type a value from the project's Kedro value for
the key (:func:`typed_params`, :func:`type_param`): a mapping takes only a mapping, a scalar or
a list is converted to its own kind, null takes anything. A key may declare its kind,
``key:int=10.0``, which the compiler always emits; it must agree with the Kedro value's. A key
Kedro does not have is accepted (as Kedro's own ``--params`` does) and its value inferred as a
user would expect on a command line: ``3`` an int, ``0.5`` a float, ``true``/``false`` a bool,
``null`` None, ``[...]``/``{...}`` JSON, anything else a string. Dotted keys build nested
mappings (``model.lr=0.1`` -> ``{"model": {"lr": 0.1}}``), which Kedro merges over the nested
parameters as its own ``--params`` does.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from kvx_runtime.dynamic_config import deep_merge
from kvx_runtime.errors import UsageError

__all__ = [
    "KINDS",
    "SECRET_HINT",
    "SECRET_KEY_NAMES",
    "SECRET_NAME_SUFFIXES",
    "SPEC_TYPES",
    "check_shapes",
    "convert",
    "fits",
    "is_missing",
    "kind_of",
    "kind_of_spec_type",
    "lookup",
    "parse_param_value",
    "parse_params",
    "quoted",
    "says_secret",
    "secret_params",
    "secret_params_given",
    "split_param",
    "type_param",
    "typed_params",
]

_INT = re.compile(r"^[+-]?\d+$")
_FLOAT = re.compile(r"^[+-]?(\d+\.\d*|\.\d+|\d+)([eE][+-]?\d+)?$|^[+-]?(inf|nan)$", re.IGNORECASE)
_KEY = re.compile(r"^[A-Za-z_][\w\-]*(\.[A-Za-z_0-9][\w\-]*)*$")
_MAX_KEY_PARTS = 32
#: Longest value (or list of keys) quoted in a message.
_SHOWN = 60


# --- the table -----------------------------------------------------------------------------


def _as_str(text: str) -> str:
    return text


def _as_int(text: str) -> int:
    """``7``, or a whole number written otherwise (``7.0``, ``1e3``), exactly: through a float,
    ``12345678901234567.0`` would become ...568."""
    try:
        return int(text)
    except ValueError:
        pass
    from decimal import Decimal, InvalidOperation

    try:
        number = Decimal(text.strip())
    except InvalidOperation:
        raise ValueError("not a number") from None
    if not number.is_finite() or number != number.to_integral_value():
        raise ValueError("not a whole number")
    if number.adjusted() > 4000:  # Python refuses to print ints of more digits
        raise ValueError("too large a number")
    return int(number)


def _as_float(text: str) -> float:
    return float(text)


def _as_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered not in {"true", "false"}:
        raise ValueError("not true or false")
    return lowered == "true"


def _json(text: str) -> Any:
    """JSON no deeper than any configuration (deeper input would exhaust the stack later)."""
    from kvx_runtime.config import MAX_DEPTH, nesting_depth

    try:
        value = json.loads(text)
    except RecursionError:
        raise ValueError(f"JSON nested more than {MAX_DEPTH} levels deep") from None
    if nesting_depth(value) > MAX_DEPTH:
        raise ValueError(f"JSON nested more than {MAX_DEPTH} levels deep")
    return value


class _OtherJson(ValueError):
    """Valid JSON of another kind."""


def _as_json(kind: type) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        value = _json(text)
        if not isinstance(value, kind):
            raise _OtherJson(f"not a JSON {kind.__name__}")
        return value

    return convert


#: kind -> (converter from text, Python types of its values, what its text looks like)
_KINDS: dict[str, tuple[Callable[[str], Any], tuple[type, ...], str]] = {
    "str": (_as_str, (str,), "any text"),
    "int": (_as_int, (int,), "a whole number"),
    "float": (_as_float, (float,), "a number"),
    "bool": (_as_bool, (bool,), "true or false"),
    "list": (_as_json(list), (list,), "a JSON list"),
    "dict": (_as_json(dict), (Mapping,), "a JSON object"),
}
KINDS: tuple[str, ...] = tuple(_KINDS)
#: kind -> its pipeline spec parameter type (compiler.spec.PARAMETER_TYPES is this table).
SPEC_TYPES: dict[str, str] = {
    "str": "STRING",
    "int": "NUMBER_INTEGER",
    "float": "NUMBER_DOUBLE",
    "bool": "BOOLEAN",
    "list": "LIST",
    "dict": "STRUCT",
}
_KIND_OF_SPEC_TYPE = {spec_type: kind for kind, spec_type in SPEC_TYPES.items()}


def kind_of_spec_type(spec_type: str) -> str:
    """The kind of a pipeline spec parameter type (``NUMBER_INTEGER`` -> ``int``); KeyError if none."""
    return _KIND_OF_SPEC_TYPE[spec_type]


def convert(kind: str, text: str) -> Any:
    """``text`` as a value of ``kind``; ValueError (saying why) when it is not one."""
    if kind not in _KINDS:
        raise ValueError(f"unknown type {quoted(kind)} (use {', '.join(KINDS)})")
    return _KINDS[kind][0](text)


def kind_of(value: Any) -> str | None:
    """The kind of a Kedro parameter's value (a bool is a bool, not an int); None for null or
    anything that is none of the kinds."""
    if isinstance(value, bool):
        return "bool"
    for kind, (_, types, _) in _KINDS.items():
        if kind != "bool" and isinstance(value, types):
            return kind
    return None


def fits(kind: str, value: Any) -> bool:
    """Does a Kedro value fit ``kind``? Its own kind does, and an int fits float."""
    actual = kind_of(value)
    return actual == kind or (kind == "float" and actual == "int")


# --- messages ------------------------------------------------------------------------------


def _shortened(text: str, limit: int = _SHOWN) -> str:
    text = " ".join(text.split()) if "\n" in text else text
    return text if len(text) <= limit else text[: limit - 3] + "..."


def quoted(text: str) -> str:
    """``text`` shortened for a message, in quotes."""
    return repr(_shortened(text))


def _article(kind: str | None, value: Any = None) -> str:
    if kind is None:
        return "null" if value is None else f"a {type(value).__name__}"
    return {"int": "an int", "dict": "a mapping"}.get(kind, f"a {kind}")


def _described(value: Any, text: str | None = None) -> str:
    """``an int (5)``, ``a str (yes)``, ``null``: a value's kind and (shortened) text."""
    if value is None:
        return "null"
    if text is None:
        try:
            text = value if isinstance(value, str) else json.dumps(value, default=str)
        except (TypeError, ValueError, RecursionError):
            text = type(value).__name__
    return f"{_article(kind_of(value), value)} ({_shortened(str(text))})"


def _a_mapping(kedro: Mapping[str, Any]) -> str:
    keys = ", ".join(map(str, kedro))
    return f"a mapping (keys: {_shortened(keys)})" if keys else "a mapping (no keys)"


def _expected(kind: str) -> str:
    return f"{_article(kind)} ({_KINDS[kind][2]})"


# --- Kedro parameters ----------------------------------------------------------------------

_MISSING: Any = object()


def lookup(params: Mapping[str, Any], dotted: str) -> tuple[Any, str | None]:
    """The Kedro value of the dotted key: ``(value, None)``; ``(MISSING, None)`` when Kedro has
    no such key (a null on the way counts as no key: it takes anything); ``(MISSING, prefix)``
    when the key walks through ``prefix``, a value that is not a mapping."""
    value: Any = params
    walked: list[str] = []
    for part in dotted.split("."):
        if value is None:
            return _MISSING, None
        if not isinstance(value, Mapping):
            return _MISSING, ".".join(walked)
        if part not in value:
            return _MISSING, None
        value = value[part]
        walked.append(part)
    return value, None


def is_missing(value: Any) -> bool:
    """Is this :func:`lookup`'s "Kedro has no such key"?"""
    return value is _MISSING


def _check_nested(label: str, path: str, given: Any, kedro: Any) -> None:
    """A mapping given for ``path``: every key Kedro has keeps its shape (a mapping stays a
    mapping, a scalar or list does not become one)."""
    if not isinstance(given, Mapping) or not isinstance(kedro, Mapping):
        return
    for name, value in given.items():
        if name not in kedro:
            continue
        current, where = kedro[name], f"{path}.{name}" if path else str(name)
        if isinstance(current, Mapping):
            if not isinstance(value, Mapping):
                raise UsageError(f"--param {label}: {where}: expected {_a_mapping(current)}, got {_described(value)}")
            _check_nested(label, where, value, current)
        elif current is not None and isinstance(value, Mapping):
            raise UsageError(
                f"--param {label}: {where} is {_described(current)} in the Kedro parameters, not a mapping"
            )


def check_shapes(params: Mapping[str, Any], kedro_params: Mapping[str, Any]) -> None:
    """Runtime params already typed (a mapping): UsageError where one changes the shape of a
    Kedro parameter (see :func:`type_param`)."""
    for name, value in params.items():
        _check_nested(str(name), "", {name: value}, kedro_params)


def _converted(key: str, kind: str, text: str) -> Any:
    try:
        return convert(kind, text)
    except ValueError as exc:
        if kind not in _KINDS:
            raise UsageError(f"--param {key}: {exc}") from None
        detail = f" ({exc})" if kind in {"list", "dict"} and not isinstance(exc, _OtherJson) else ""
        raise UsageError(f"--param {key}: expected {_expected(kind)}, got {quoted(text)}{detail}") from None


def type_param(key: str, text: str, kedro: Any = _MISSING, declared: str | None = None) -> Any:
    """The value of ``--param key[:declared]=text`` for a key whose Kedro value is ``kedro``.

    A Kedro mapping takes a mapping only (and keeps the shape of what it holds); a Kedro scalar
    or list types the text as its own kind, or with a declared kind, must be of that kind (int
    and float agree, and give a float for a float); a Kedro null, or a key Kedro does not have,
    takes anything (typed as declared, or inferred). UsageError, naming the key, otherwise.
    """
    expected = None if kedro is _MISSING or kedro is None else kind_of(kedro)
    if expected == "dict" and declared in {None, "dict"}:
        value = parse_param_value(text, key)  # a JSON object is a dict either way
    elif declared is not None:
        value = _converted(key, declared, text)
    elif expected is not None:
        return _converted(key, expected, text)
    else:  # null in Kedro, no such key, or a value of no kind of ours: inferred
        return parse_param_value(text, key)
    if expected == "dict":
        if not isinstance(value, Mapping):
            raise UsageError(f"--param {key}: expected {_a_mapping(kedro)}, got {_described(value, text)}")
        _check_nested(key, key, value, kedro)
        return value
    if expected is None or declared == expected:
        return value
    if {declared, expected} == {"int", "float"}:
        return float(value)
    raise UsageError(f"--param {key}:{declared}: declared {declared}, but the Kedro parameter is {_described(kedro)}")


# --- the command line ----------------------------------------------------------------------


def parse_param_value(text: str, key: str | None = None) -> Any:
    """Infer the type of one command-line value (see the module docstring)."""
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
        except ValueError as exc:
            where = f"--param {key}: value" if key else "--param value"
            raise UsageError(f"{where} {quoted(text)} looks like JSON but is invalid: {exc}") from None
    return text


def split_param(item: str) -> tuple[str, str | None, str]:
    """``key[:kind]=value`` -> (key, kind or None, value text), the key checked."""
    key, sep, raw = item.partition("=")
    key, _, kind = key.strip().partition(":")
    if not sep or not key:
        raise UsageError(f"--param {quoted(item)} must look like key=value")
    if not _KEY.match(key):
        raise UsageError(f"--param key {quoted(key)} is not a parameter name (letters, digits, _ and dots)")
    if key.count(".") >= _MAX_KEY_PARTS:
        raise UsageError(f"--param key {quoted(key)} has more than {_MAX_KEY_PARTS} dotted parts")
    if kind and kind not in _KINDS:
        raise UsageError(f"--param {key}: unknown type {quoted(kind)} (use {', '.join(KINDS)})")
    return key, kind or None, raw


def typed_params(items: Iterable[str], kedro_params: Mapping[str, Any]) -> dict[str, Any]:
    """``["a.b=1", "c=x"]`` -> ``{"a": {"b": 1}, "c": "x"}``, each value typed from its Kedro
    value in ``kedro_params`` (:func:`type_param`); later items win. UsageError naming the key
    for a value that does not fit, or a dotted key through a Kedro value that is no mapping."""
    result: dict[str, Any] = {}
    for item in items:
        key, declared, raw = split_param(item)
        kedro, blocked = lookup(kedro_params, key)
        if blocked is not None:
            current, _ = lookup(kedro_params, blocked)
            raise UsageError(
                f"--param {key}: {blocked} is {_described(current)} in the Kedro parameters, not a mapping"
            )
        value = type_param(key, raw, kedro, declared)
        for part in reversed(key.split(".")):
            value = {part: value}
        result = deep_merge(result, value)
    return result


def parse_params(items: Iterable[str]) -> dict[str, Any]:
    """The params without a project: typed as declared, or inferred (:func:`typed_params`)."""
    return typed_params(items, {})


def parse_params_before_typing(items: Iterable[str]) -> dict[str, Any]:
    """:func:`parse_params` for values the project's Kedro parameters type later: a value that
    only looks like JSON (``{date}_report.csv``, ``[A-Z]+``) stays text here, for a Kedro string
    takes it as it is (and a Kedro mapping or list refuses it then, naming the key)."""
    items = list(items)
    parsed: dict[str, Any] = {}
    for item in items:
        try:
            value = typed_params([item], {})
        except UsageError:
            key, declared, raw = split_param(item)  # a bad key is the caller's error here too
            if declared is not None:
                raise
            value = typed_params([f"{key}:str={raw}"], {})
        parsed = deep_merge(parsed, value)
    return parsed


# --- parameters whose names say secret ---------------------------------------------------------

#: The last part of a parameter name that says its value is a secret (``github_token``,
#: ``db.password``, ``client_secret``). Literal suffixes: linear on any input.
SECRET_NAME_SUFFIXES = ("token", "password", "passwd", "secret")
#: A ``key`` that is a secret says which (``api_key``, ``accessKey``, ``private-key``, a bare
#: ``key``); a key of data (``sort_key``, ``label_key``, ``primary_key``) is not one.
SECRET_KEY_NAMES = tuple(f"{kind}key" for kind in (
    "api", "access", "secret", "private", "client", "account", "auth", "signing", "encryption", "master",
    "ssh", "license", "licence", "subscription", "app", "consumer", "session", "service", "storage", "sas"))
#: Where such values belong instead (said wherever one is kept out of MLflow).
SECRET_HINT = ("secrets belong in credentials.yml (conf/local, or written at run time by "
               "run_config.dynamic_config_providers), not in parameters")


def says_secret(name: str) -> bool:
    """Does the (dotted) parameter name say its value is a secret?"""
    last = name.rsplit(".", 1)[-1].lower()
    if last.endswith(SECRET_NAME_SUFFIXES):
        return True
    compact = last.replace("_", "").replace("-", "")
    return compact == "key" or compact.endswith(SECRET_KEY_NAMES)


def secret_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, list[str]]:
    """Dotted names of the parameters in ``params`` whose names say secret -> their text values
    (every string and number under such a name, nested ones included)."""
    found: dict[str, list[str]] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if says_secret(str(key)):
            found[name] = _leaves(value)
        elif isinstance(value, Mapping):
            found.update(secret_params(value, f"{name}."))
    return found


def secret_params_given(params: Mapping[str, Any], items: Iterable[str]) -> dict[str, list[str]]:
    """:func:`secret_params` of the typed ``params``, plus each ``key[:kind]=value`` item's text as
    given (``10``, where typing made it ``10.0``): every form in which the value may be shown."""
    found = secret_params(params)
    for item in items:
        key, _, text = split_param(item)
        if says_secret(key):
            found.setdefault(key, []).append(text)
    return found


def items_shown(items: Iterable[str]) -> tuple[str, ...]:
    """``key[:kind]=value`` items as they may be shown (a replay line, a step log's header): the
    value of a parameter whose name says secret, and every secret-named value inside a mapping
    value, masked as the log masks secrets. An item that cannot be read whole is shown as
    ``key=`` the mask."""
    from kvx_runtime.log import REDACTED as mask

    shown = []
    for item in items:
        try:
            key, kind, raw = split_param(item)
        except UsageError:
            shown.append(f"{item.partition('=')[0]}={mask}")
            continue
        head = f"{key}:{kind}" if kind else key
        if says_secret(key):
            shown.append(f"{head}={mask}")
            continue
        try:
            value = parse_param_value(raw, key)
        except UsageError:
            value = None
        for texts in secret_params(value).values() if isinstance(value, Mapping) else ():
            for text in sorted(filter(None, texts), key=len, reverse=True):
                raw = raw.replace(text, mask)
        shown.append(f"{head}={raw}")
    return tuple(shown)


def _leaves(value: Any) -> list[str]:
    if isinstance(value, Mapping):
        return [text for item in value.values() for text in _leaves(item)]
    if isinstance(value, (list, tuple)):
        return [text for item in value for text in _leaves(item)]
    return [] if value is None or isinstance(value, bool) else [str(value)]
