"""One save version per pipeline run: parsing, which inputs load it, retried saves."""

from __future__ import annotations

from pathlib import Path

import pytest
from kedro.io import DataCatalog
from kedro.io.core import generate_timestamp

from kvx_runtime.errors import UsageError
from kvx_runtime.versions import (
    kedro_version,
    parse_load_versions,
    remove_earlier_attempt,
    run_load_versions,
    versioned_names,
)


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("2026-11-24T10:15:00Z", "2026-11-24T10.15.00.000Z"),
        ("2026-11-24T10:15:00.123456Z", "2026-11-24T10.15.00.123Z"),
        ("2026-11-24T10:15:00.123456789Z", "2026-11-24T10.15.00.123Z"),
        ("2026-11-24T11:15:00.5+01:00", "2026-11-24T10.15.00.500Z"),
        ("2026-11-24T09:45:00-00:30", "2026-11-24T10.15.00.000Z"),
        ("2026-11-24T10.15.00.123Z", "2026-11-24T10.15.00.123Z"),
    ],
)
def test_run_versions_are_kedro_versions(given: str, expected: str) -> None:
    assert kedro_version(given) == expected


def test_kedros_own_versions_pass_unchanged() -> None:
    stamp = generate_timestamp()
    assert kedro_version(stamp) == stamp


@pytest.mark.parametrize("bad", ["{{$.pipeline_job_create_time_utc}}", "", "yesterday", "2026-13-01"])
def test_unresolved_or_bad_versions_are_usage_errors(bad: str) -> None:
    with pytest.raises(UsageError, match="neither a Kedro version"):
        kedro_version(bad)


def test_load_version_flags() -> None:
    assert parse_load_versions(["a=2026-01-01T00.00.00.000Z", " b = v "]) == {
        "a": "2026-01-01T00.00.00.000Z", "b": "v"}
    with pytest.raises(UsageError, match="dataset=version"):
        parse_load_versions(["novalue="])


CATALOG = {
    "model@pickle": {"type": "pickle.PickleDataset", "filepath": "data/model.pkl", "versioned": True},
    "model@bytes": {"type": "pickle.PickleDataset", "filepath": "data/model.pkl", "versioned": True},
    "plain": {"type": "pandas.CSVDataset", "filepath": "data/plain.csv"},
    "{name}_report": {"type": "text.TextDataset", "filepath": "data/{name}.md", "versioned": True,
                      "credentials": "missing_on_purpose"},
}


def test_versioned_inputs_load_the_runs_version_and_explicit_versions_win() -> None:
    names = ["model@bytes", "plain", "daily_report", "in_memory"]
    assert versioned_names(CATALOG, names) == ["daily_report", "model@bytes"]
    version = "2026-11-24T10.15.00.000Z"
    assert run_load_versions(CATALOG, names, version, {"daily_report": "2020-01-01T00.00.00.000Z"}) == {
        "model@bytes": version, "daily_report": "2020-01-01T00.00.00.000Z"}


def test_a_retried_save_replaces_its_own_earlier_attempt(tmp_path: Path) -> None:
    version = "2026-11-24T10.15.00.000Z"
    config = {"model": {"type": "pickle.PickleDataset", "filepath": str(tmp_path / "model.pkl"), "versioned": True}}
    first = DataCatalog.from_config(config, save_version=version)
    first.save("model", {"attempt": 1})
    second = DataCatalog.from_config(config, save_version=version)
    with pytest.raises(Exception, match="must not exist"):
        second.save("model", {"attempt": 2})  # what Kedro does on its own
    assert remove_earlier_attempt(second.get("model"), "model", version)
    second.save("model", {"attempt": 2})
    assert DataCatalog.from_config(config, load_versions={"model": version}).load("model") == {"attempt": 2}
    assert [p.name for p in (tmp_path / "model.pkl").iterdir()] == [version]
    # Another run's version is never touched.
    assert not remove_earlier_attempt(second.get("model"), "model", "2026-11-24T10.15.00.001Z")
