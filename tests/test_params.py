"""--param parsing: typed values and dotted keys, as Kedro's runtime params; the one typing
table (kinds, converters, a Kedro value's kind) shared by run-once, run-local and exec-node; and
exec-node's check of --param values against the project's Kedro parameters."""

from __future__ import annotations

import pytest

from kvx_runtime.errors import UsageError
from kvx_runtime.params import (
    KINDS,
    SPEC_TYPES,
    check_shapes,
    convert,
    fits,
    kind_of,
    kind_of_spec_type,
    parse_param_value,
    parse_params,
    typed_params,
)


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("3", 3),
        ("-7", -7),
        ("0.25", 0.25),
        ("1e-3", 0.001),
        ("true", True),
        ("False", False),
        ("null", None),
        ("[1, 2, \"a\"]", [1, 2, "a"]),
        ('{"a": {"b": 1}}', {"a": {"b": 1}}),
        ("hello world", "hello world"),
        ("2024-01-01", "2024-01-01"),
        ("v1.2", "v1.2"),
    ],
)
def test_values_are_typed(text: str, value: object) -> None:
    assert parse_param_value(text) == value
    assert type(parse_param_value(text)) is type(value)


def test_dotted_keys_build_nested_overrides() -> None:
    params = parse_params(["model.options.lr=0.1", "model.options.layers=[8, 4]", "seed=3", "model.name=x"])
    assert params == {"model": {"options": {"lr": 0.1, "layers": [8, 4]}, "name": "x"}, "seed": 3}


def test_later_values_win_and_equals_in_values_are_kept() -> None:
    assert parse_params(["a=1", "a=2", "q=x=y"]) == {"a": 2, "q": "x=y"}


@pytest.mark.parametrize("item", ["noequals", "=3", "bad key=1", "a..b=1"])
def test_malformed_params_are_usage_errors(item: str) -> None:
    with pytest.raises(UsageError, match="--param"):
        parse_params([item])


def test_broken_json_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="looks like JSON but is invalid"):
        parse_params(["x=[1, 2"])


@pytest.mark.parametrize(
    ("item", "expected"),
    [
        ("n:int=10.0", 10),
        ("n:int=7", 7),
        ("x:float=3", 3.0),
        ("s:str=42", "42"),
        ("b:bool=true", True),
        ("b:bool=False", False),
        ("l:list=[1, 2]", [1, 2]),
        ('d:dict={"a": 1}', {"a": 1}),
    ],
)
def test_typed_keys_as_the_compiler_emits_them(item: str, expected: object) -> None:
    (value,) = parse_params([item]).values()
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize("item", ["n:int=1.5", "b:bool=maybe", "l:list={}", "x:complex=1"])
def test_values_that_do_not_match_their_type_are_usage_errors(item: str) -> None:
    with pytest.raises(UsageError):
        parse_params([item])


@pytest.mark.parametrize("item", ["b:bool=yes", "b:bool=1", "b:bool=no", "b:bool=0"])
def test_a_bool_is_true_or_false_only(item: str) -> None:
    with pytest.raises(UsageError, match="expected a bool"):
        parse_params([item])


# --- the one typing table ------------------------------------------------------------------


def test_kinds_and_spec_types_are_one_table() -> None:
    from kvx_runtime.compiler.spec import PARAMETER_TYPES

    assert KINDS == ("str", "int", "float", "bool", "list", "dict")
    assert PARAMETER_TYPES == SPEC_TYPES
    assert [kind_of_spec_type(SPEC_TYPES[kind]) for kind in KINDS] == list(KINDS)


@pytest.mark.parametrize(("value", "kind"), [
    (True, "bool"), (False, "bool"), (3, "int"), (0.5, "float"), ("x", "str"), ([1], "list"),
    ({"a": 1}, "dict"), (None, None), ((1, 2), None),
])
def test_the_kind_of_a_kedro_value(value: object, kind: str | None) -> None:
    assert kind_of(value) == kind


@pytest.mark.parametrize(("kind", "value", "fit"), [
    ("float", 3, True), ("float", 0.5, True), ("int", 0.5, False), ("int", True, False),
    ("float", True, False), ("str", 3, False), ("dict", {}, True), ("list", {}, False), ("bool", None, False),
])
def test_a_kedro_default_fits_a_kind(kind: str, value: object, fit: bool) -> None:
    assert fits(kind, value) is fit


TEXTS = ["yes", "1", "no", "0", "True", "false", " true ", "10.0", "1.5", "7", "-3", "1e3", "nan", "abc", "",
         "null", "[1, 2]", '{"a": 1}', "[1, 2", '{"a": [' * 70 + "]}" * 70]
#: A Kedro value of each kind, for typing "from the Kedro value".
KEDRO_VALUES = {"str": "x", "int": 3, "float": 0.5, "bool": True, "list": ["a"], "dict": {"a": 0}}


def _outcome(function, *args: object) -> tuple[str, str]:
    try:
        value = function(*args)
    except UsageError:
        return ("error", "")
    return (type(value).__name__, repr(value))


@pytest.mark.parametrize("kind", KINDS)
def test_run_once_and_exec_node_agree_on_typing(kind: str) -> None:
    """One table: run-local's overrides (the spec's type), run-once's values (the compiler, from
    the Kedro value), exec-node's declared ``key:kind=`` (what the compiler emits) and exec-node's
    ``key=`` typed from the Kedro value give one result, or all refuse."""
    from kvx_runtime.compiler.kfp_reader import coerce
    from kvx_runtime.compiler.planner import _run_values

    kedro = {"k": KEDRO_VALUES[kind]}
    for text in TEXTS:
        outcomes = {
            "run-local": _outcome(coerce, "k", SPEC_TYPES[kind], text),
            "run-once": _outcome(lambda t: _run_values({"k": t}, [], kedro)[1]["k"], text),
            "exec-node declared": _outcome(lambda t: parse_params([f"k:{kind}={t}"])["k"], text),
            "exec-node from Kedro": _outcome(lambda t: typed_params([f"k={t}"], kedro)["k"], text),
        }
        assert len(set(outcomes.values())) == 1, (kind, text, outcomes)


@pytest.mark.parametrize(("kind", "text", "expected"), [
    ("int", "10.0", 10), ("int", "7", 7), ("int", "1e3", 1000), ("float", "1", 1.0), ("bool", "True", True),
    ("bool", " false ", False), ("str", "3", "3"), ("list", "[1, 2]", [1, 2]), ("dict", '{"a": 1}', {"a": 1}),
])
def test_the_table_converts_text(kind: str, text: str, expected: object) -> None:
    value = convert(kind, text)
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize(("kind", "text"), [
    ("int", "1.5"), ("int", "inf"), ("float", "x"), ("bool", "yes"), ("bool", "1"), ("bool", "no"), ("bool", "0"),
    ("list", "{}"), ("dict", "[]"), ("dict", "{"), ("list", "[" * 5000 + "]" * 5000),
])
def test_the_table_refuses_text_that_is_not_of_the_kind(kind: str, text: str) -> None:
    with pytest.raises(ValueError):
        convert(kind, text)


def test_integers_keep_every_digit() -> None:
    assert convert("int", "12345678901234567891") == 12345678901234567891
    # Written as decimals or with an exponent: exact too (a float would give ...568).
    assert convert("int", "12345678901234567.0") == 12345678901234567 and convert("int", "1e3") == 1000
    for text in ("nan", "1e99999", "2.5e-1"):
        with pytest.raises(ValueError):
            convert("int", text)


# --- the shape check (exec-node's --param against the project's Kedro parameters) ----------

KEDRO = {
    "data_science": {"model_options": {"test_size": 0.2, "random_state": 3, "features": ["a", "b"],
                                       "scaler": {"method": "standard"}}},
    "seed": 3,
    "lr": 0.5,
    "name": "x",
    "flag": True,
    "nothing": None,
    "features": ["a"],
}


@pytest.mark.parametrize(("item", "message"), [
    ("data_science.model_options=yes", "--param data_science.model_options: expected a mapping (keys: test_size, "
                                       "random_state, features, scaler), got a str (yes)"),
    ("data_science=5", "--param data_science: expected a mapping (keys: model_options), got an int (5)"),
    ("data_science=null", "--param data_science: expected a mapping (keys: model_options), got null"),
    ("data_science:int=5", "--param data_science: expected a mapping (keys: model_options), got an int (5)"),
    ('data_science={"model_options": true}', "--param data_science: data_science.model_options: expected a "
                                             "mapping (keys: test_size, random_state, features, scaler), got a "
                                             "bool (true)"),
    ('data_science.model_options={"test_size": {"a": 1}}', "--param data_science.model_options: "
                                                          "data_science.model_options.test_size is a float (0.2) "
                                                          "in the Kedro parameters, not a mapping"),
    ("seed.x=1", "--param seed.x: seed is an int (3) in the Kedro parameters, not a mapping"),
    ("data_science.model_options.random_state.x=1", "--param data_science.model_options.random_state.x: "
                                                    "data_science.model_options.random_state is an int (3)"),
    ("features.0=b", "--param features.0: features is a list ([\"a\"]) in the Kedro parameters, not a mapping"),
    ("flag=maybe", "--param flag: expected a bool (true or false), got 'maybe'"),
    ("flag=yes", "--param flag: expected a bool (true or false), got 'yes'"),
    ("seed=1.5", "--param seed: expected an int (a whole number), got '1.5'"),
    ("lr=fast", "--param lr: expected a float (a number), got 'fast'"),
    ("features=a", "--param features: expected a list (a JSON list), got 'a'"),
    ("seed:str=3", "--param seed:str: declared str, but the Kedro parameter is an int (3)"),
    ("name:int=3", "--param name:int: declared int, but the Kedro parameter is a str (x)"),
    ("flag:int=1", "--param flag:int: declared int, but the Kedro parameter is a bool (true)"),
])
def test_a_param_that_does_not_fit_its_kedro_value_is_a_usage_error(item: str, message: str) -> None:
    with pytest.raises(UsageError) as caught:
        typed_params([item], KEDRO)
    assert caught.value.message.startswith(message)
    assert "\n" not in caught.value.message


@pytest.mark.parametrize(("item", "expected"), [
    ("lr=1", {"lr": 1.0}),
    ("name=3", {"name": "3"}),
    ("name=true", {"name": "true"}),
    ("flag=FALSE", {"flag": False}),
    ("seed=10.0", {"seed": 10}),
    ("features=[1]", {"features": [1]}),
    ("nothing=3", {"nothing": 3}),
    ("nothing.deeper=x", {"nothing": {"deeper": "x"}}),
    ("lr:int=2", {"lr": 2.0}),
    ("seed:float=2", {"seed": 2.0}),
    ("seed:int=10.0", {"seed": 10}),
    ("data_science.model_options.test_size=1", {"data_science": {"model_options": {"test_size": 1.0}}}),
    ('data_science.model_options={"test_size": 0.3}', {"data_science": {"model_options": {"test_size": 0.3}}}),
    ('data_science:dict={"model_options": {}}', {"data_science": {"model_options": {}}}),
    ("brand.new=7", {"brand": {"new": 7}}),
    ("kvx_final_status:dict={\"state\": \"SUCCEEDED\"}", {"kvx_final_status": {"state": "SUCCEEDED"}}),
])
def test_params_are_typed_from_their_kedro_value(item: str, expected: dict) -> None:
    typed = typed_params([item], KEDRO)
    assert typed == expected
    assert repr(typed) == repr(expected)  # the types too (1.0, not 1)


def test_long_values_are_shortened_in_messages() -> None:
    with pytest.raises(UsageError) as caught:
        typed_params(["data_science.model_options=" + "x" * 5000], KEDRO)
    assert len(caught.value.message) < 200 and "x" * 60 not in caught.value.message
    with pytest.raises(UsageError) as caught:
        typed_params(["seed=" + "9" * 10 + "." + "5" * 5000], KEDRO)
    assert len(caught.value.message) < 200


def test_typed_params_keep_the_nesting_of_dotted_keys() -> None:
    typed = typed_params(["data_science.model_options.test_size=0.3", "data_science.model_options.random_state=4",
                          "seed=5"], KEDRO)
    assert typed == {"data_science": {"model_options": {"test_size": 0.3, "random_state": 4}}, "seed": 5}


def test_already_typed_params_have_their_shapes_checked() -> None:
    check_shapes({"data_science": {"model_options": {"test_size": 0.3}}, "new": 1}, KEDRO)
    with pytest.raises(UsageError, match="--param data_science: data_science.model_options: expected a mapping"):
        check_shapes({"data_science": {"model_options": "yes"}}, KEDRO)
    with pytest.raises(UsageError, match="seed is an int"):
        check_shapes({"seed": {"x": 1}}, KEDRO)


def test_the_compiler_looks_kedro_parameters_up_in_the_same_table() -> None:
    from kvx_runtime.compiler.planner import _coerce_default, _kind_of, _lookup
    from kvx_runtime.errors import ConfigError

    assert _lookup(KEDRO, "data_science.model_options.random_state") == 3
    with pytest.raises(ConfigError, match=r"--params seed\.x: no such Kedro parameter \(seed is not a mapping\)"):
        _lookup(KEDRO, "seed.x")
    with pytest.raises(ConfigError, match="no such Kedro parameter"):
        _lookup(KEDRO, "data_science.nope")
    assert _kind_of(True) == "bool" and _kind_of(KEDRO["data_science"]) == "dict"
    with pytest.raises(ConfigError, match="NoneType cannot be a pipeline parameter"):
        _kind_of(None)
    assert _coerce_default("seed", "float", 3) == 3.0
    with pytest.raises(ConfigError, match="is not a int"):
        _coerce_default("lr", "int", 0.5)


@pytest.mark.parametrize(("name", "secret"), [
    ("api_key", True), ("AccountKey", True), ("services.github_token", True), ("db.password", True),
    ("client_secret", True), ("key", True), ("keys", False), ("token_ttl", False), ("model.lr", False),
    ("api_key.enabled", False), ("secrets.region", False), ("apiKey", True), ("private-key", True),
    ("aws.secret_access_key", True), ("storage_account_key", True), ("passwd", True),
    # Keys of data, not secrets: their values (time, label) must not be masked in every log line.
    ("sort_key", False), ("label_key", False), ("primary_key", False), ("newkey", False), ("monkey", False),
])
def test_names_that_say_secret(name: str, secret: bool) -> None:
    from kvx_runtime.params import says_secret

    assert says_secret(name) is secret


def test_secret_params_finds_nested_values_as_text() -> None:
    from kvx_runtime.params import secret_params

    found = secret_params({"api_key": "abc-123", "db": {"password": 12345, "host": "h"},
                           "vendor_token": {"a": "x1", "b": ["y2", None, True]}, "lr": 0.1})
    assert found == {"api_key": ["abc-123"], "db.password": ["12345"], "vendor_token": ["x1", "y2"]}


def test_secret_params_given_keep_the_text_as_given() -> None:
    from kvx_runtime.params import secret_params_given

    found = secret_params_given({"api_key": 10.0, "lr": 0.1}, ["api_key:float=10", "lr=0.1", "db.password=pw-1234"])
    assert found == {"api_key": ["10.0", "10"], "db.password": ["pw-1234"]}
