"""--param parsing: typed values and dotted keys, as Kedro's runtime params."""

from __future__ import annotations

import pytest

from kvx_runtime.errors import UsageError
from kvx_runtime.params import parse_param_value, parse_params


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
