"""One save version per pipeline run: parsing, which inputs load it, retried saves."""

from __future__ import annotations

from pathlib import Path

import pytest
from kedro.io import DataCatalog
from kedro.io.core import generate_timestamp

from kvx_runtime.errors import ExitCode, InputDataError, UsageError
from kvx_runtime.storage.store import BlobStore
from kvx_runtime.versions import (
    RUN_VERSION_RECORD,
    kedro_version,
    parse_load_versions,
    recorded_save_version,
    remove_earlier_attempt,
    run_load_versions,
    versioned_names,
)

# Save versions through Kedro's catalog and versioned datasets.
pytestmark = pytest.mark.kedro


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


@pytest.mark.parametrize("bad", ["{{$.pipeline_job_create_time_utc}}", "", "yesterday", "2026-13-01",
                                 "2026-13-01T00:00:00Z", "2026-02-30T10:00:00Z", "0001-01-01T00:00:00+01:00"])
def test_unresolved_or_bad_versions_are_usage_errors(bad: str) -> None:
    with pytest.raises(UsageError, match="^--save-version .* neither a Kedro version"):
        kedro_version(bad)
    with pytest.raises(UsageError, match="^--job-create-time .* neither a Kedro version"):
        kedro_version(bad, given_as="--job-create-time")


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


def test_the_first_step_records_the_run_version_and_later_steps_read_it(tmp_path: Path) -> None:
    from datetime import datetime, timezone

    store = BlobStore(str(tmp_path), "job-1")
    first = recorded_save_version(store, "run-1", now=datetime(2026, 11, 24, 10, 15, 0, 123456, timezone.utc))
    later = recorded_save_version(store, "run-1", now=datetime(2026, 11, 24, 11, 0, 0, tzinfo=timezone.utc))
    assert first == later == "2026-11-24T10.15.00.123Z"
    assert recorded_save_version(BlobStore(str(tmp_path), "job-2"), "run-2") != first  # its own job dir


def test_a_job_directory_of_another_run_is_refused(tmp_path: Path) -> None:
    recorded_save_version(BlobStore(str(tmp_path), "shared-name"), "run-1")
    expected = "records the save version of run run-1, not of this run \\(run-2\\)"
    with pytest.raises(UsageError, match=expected) as refused:
        recorded_save_version(BlobStore(str(tmp_path), "shared-name"), "run-2")
    assert refused.value.exit_code == ExitCode.USAGE


@pytest.mark.parametrize(
    "content", [b"", b"{not json", b'{"run_id": "run-1"}', b'{"run_id": "run-1", "save_version": "soon"}']
)
def test_an_unreadable_run_version_record_is_a_clear_error(tmp_path: Path, content: bytes) -> None:
    job_dir = tmp_path / "kedro-vertexai-temp" / "job"
    job_dir.mkdir(parents=True)
    (job_dir / RUN_VERSION_RECORD).write_bytes(content)
    with pytest.raises(InputDataError, match=f"run version record {job_dir / RUN_VERSION_RECORD} is unreadable"):
        recorded_save_version(BlobStore(str(tmp_path), "job"), "run-1")
