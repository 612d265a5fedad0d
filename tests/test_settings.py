"""Every KVX_* variable in one table (kvx_runtime.settings): typed, bounded, documented."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from kvx_runtime.errors import ConfigError, ExitCode
from kvx_runtime.settings import SETTINGS, Setting

REPO = Path(__file__).resolve().parents[1]
NUMBERS = [setting for setting in SETTINGS.values() if setting.kind in (int, float)]


@pytest.mark.parametrize("setting", NUMBERS, ids=lambda s: s.name)
def test_a_number_that_cannot_be_read_is_exit_2_naming_the_variable(setting: Setting, monkeypatch) -> None:
    for bad in ("soon", "nan", "1e999", "3.5" if setting.kind is int else "-1e999"):
        monkeypatch.setenv(setting.name, bad)
        with pytest.raises(ConfigError, match=f"^{setting.name}=") as caught:
            setting.get()
        assert caught.value.exit_code == ExitCode.USAGE


@pytest.mark.parametrize("setting", NUMBERS, ids=lambda s: s.name)
def test_defaults_and_bounds(setting: Setting, monkeypatch) -> None:
    monkeypatch.delenv(setting.name, raising=False)
    assert setting.get() == setting.default
    monkeypatch.setenv(setting.name, "  ")
    assert setting.get() == setting.default
    if setting.minimum is not None:
        monkeypatch.setenv(setting.name, str(setting.kind(setting.minimum) - 1))
        with pytest.raises(ConfigError, match="out of range"):
            setting.get()
    monkeypatch.setenv(setting.name, str(setting.default))
    assert setting.get() == setting.default


def test_choices(monkeypatch) -> None:
    monkeypatch.setenv("KVX_LOG_FORMAT", "JSON")
    assert SETTINGS["KVX_LOG_FORMAT"].get() == "json"
    monkeypatch.setenv("KVX_LOG_FORMAT", "xml")
    with pytest.raises(ConfigError, match="KVX_LOG_FORMAT='xml' is not one of json, text, console"):
        SETTINGS["KVX_LOG_FORMAT"].get()


def test_the_code_reads_no_variable_outside_the_table() -> None:
    from kvx_runtime.commands.ci_workflows import REPOSITORY_VARIABLES

    names = set()
    for path in (REPO / "kvx_runtime").rglob("*.py"):
        if path.name != "settings.py":
            names |= set(re.findall(r"\bKVX_[A-Z0-9_]*[A-Z0-9]\b", path.read_text()))
    # The generated workflows' GitHub repository variables are the repository's, not ours.
    assert names - set(SETTINGS) - set(REPOSITORY_VARIABLES) == set()


def test_the_docs_name_every_variable() -> None:
    docs = "\n".join(path.read_text() for path in (REPO / "docs").glob("*.md"))
    assert [name for name in SETTINGS if name not in docs] == []
