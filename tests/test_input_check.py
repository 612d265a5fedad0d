"""Before a run is submitted, its pipeline inputs under a cloud storage root are looked for:
one that is definitely not there stops the submission (exit 2); one that cannot be told is a
warning. Against the GCS emulator, through gcsfs as the steps read it."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest

from kvx_runtime.errors import ExitCode, UsageError
from kvx_runtime.submission import refuse_missing_inputs


def test_inputs_that_are_there_let_the_run_go(gcs_emulator) -> None:
    fs = gcs_emulator.filesystem()
    fs.pipe(f"{gcs_emulator.bucket}/root/data/01_raw/companies.csv", b"id\n1\n")
    fs.pipe(f"{gcs_emulator.bucket}/root/data/01_raw/reviews/part-0.parquet", b"x")  # a folder dataset
    refuse_missing_inputs({
        "companies": f"gs://{gcs_emulator.bucket}/root/data/01_raw/companies.csv",
        "reviews": f"gs://{gcs_emulator.bucket}/root/data/01_raw/reviews",
    })


def test_a_missing_input_stops_the_submission_naming_each_missing_one(gcs_emulator) -> None:
    fs = gcs_emulator.filesystem()
    fs.pipe(f"{gcs_emulator.bucket}/there/companies.csv", b"id\n1\n")
    with pytest.raises(UsageError) as raised:
        refuse_missing_inputs({
            "companies": f"gs://{gcs_emulator.bucket}/there/companies.csv",
            "shuttles": f"gs://{gcs_emulator.bucket}/there/shuttles.xlsx",
            "reviews": f"gs://{gcs_emulator.bucket}/there/reviews.csv",
        })
    message = str(raised.value)
    assert raised.value.exit_code == ExitCode.USAGE
    assert message.startswith("pipeline inputs not in the storage root: 'reviews' at gs://")
    assert f"'shuttles' at gs://{gcs_emulator.bucket}/there/shuttles.xlsx" in message
    assert "companies" not in message and "nothing was submitted" in message
    assert "\n" not in message


def test_an_input_whose_look_up_fails_is_a_warning_not_a_refusal(caplog) -> None:
    refuse_missing_inputs({"table": "kvx-no-such-protocol://bucket/table.csv"})
    [record] = [r for r in caplog.records if "could not tell" in r.getMessage()]
    assert "pipeline input 'table' is at kvx-no-such-protocol://bucket/table.csv" in record.getMessage()
    assert "(ValueError: Protocol not known: kvx-no-such-protocol): going on" in record.getMessage()


@pytest.fixture
def silent_server() -> Iterator[str]:
    """A server on 127.0.0.1 that accepts connections and never answers."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    accepted: list[socket.socket] = []
    stopping = threading.Event()

    def accept() -> None:
        while not stopping.is_set():
            try:
                connection, _ = listener.accept()
            except OSError:
                return
            accepted.append(connection)

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    stopping.set()
    listener.close()
    for connection in accepted:
        connection.close()


def test_an_unanswered_look_up_is_given_up_after_the_timeout(silent_server, monkeypatch, caplog) -> None:
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", silent_server)
    monkeypatch.setenv("KVX_INPUT_CHECK_TIMEOUT", "1")
    refuse_missing_inputs({"companies": "gs://kvx-silent/root/companies.csv"})
    [record] = [r for r in caplog.records if "could not tell" in r.getMessage()]
    assert "(no answer within 1 s)" in record.getMessage()


def test_no_inputs_under_a_cloud_root_is_nothing_to_look_for() -> None:
    refuse_missing_inputs({})


def test_a_schedule_is_warned_of_its_missing_inputs_not_refused(gcs_emulator, caplog) -> None:
    from kvx_runtime.submission import warn_missing_inputs

    path = f"gs://{gcs_emulator.bucket}/later/companies.csv"
    assert warn_missing_inputs({"companies": path}) == ["companies"]
    [record] = [r for r in caplog.records if "scheduled runs fail" in r.getMessage()]
    assert f"pipeline input 'companies' is not at {path}: scheduled runs fail until it is copied there" in \
        record.getMessage()
    gcs_emulator.filesystem().pipe(path.removeprefix("gs://"), b"id\n")
    assert warn_missing_inputs({"companies": path}) == []


def _project(tmp_path, catalog: str = "") -> Any:
    (tmp_path / "conf" / "base").mkdir(parents=True, exist_ok=True)
    (tmp_path / "conf" / "base" / "catalog.yml").write_text(catalog)
    return SimpleNamespace(conf_source=str(tmp_path / "conf"), base_env="base", env="base")


ROOT = "gs://bucket/root"


def test_only_inputs_whose_path_a_run_reads_as_compiled_are_looked_for(tmp_path) -> None:
    from kvx_runtime.compiler.loading import _remote_inputs
    from kvx_runtime.config_loader import run_identity_values

    run_id = run_identity_values()[0]  # what ${run_id} resolved to while compiling
    configs = {
        "companies": {"type": "pandas.CSVDataset", "filepath": f"{ROOT}/data/01_raw/companies.csv"},
        "partitions": {"type": "partitions.PartitionedDataset", "path": f"{ROOT}/data/01_raw/parts"},
        "elsewhere": {"type": "pandas.CSVDataset", "filepath": "gs://other-bucket/companies.csv"},
        "per_run": {"type": "pandas.CSVDataset", "filepath": f"{ROOT}/runs/{run_id}/shuttles.csv"},
        "globbed": {"type": "spark.SparkDataset", "filepath": f"{ROOT}/data/01_raw/events/*.parquet"},
        "incoming": {"type": "partitions.IncrementalDataset", "path": f"{ROOT}/data/01_raw/incoming"},
        "alias": {"type": "pickle.PickleDataset", "filepath": f"{ROOT}/data/06_models/model.pkl"},
        "no_file": {"type": "MemoryDataset"},
    }
    found = _remote_inputs(_project(tmp_path), configs, ROOT,
                           written_paths={"model": f"{ROOT}/data/06_models/model.pkl"})
    assert found == {"companies": f"{ROOT}/data/01_raw/companies.csv", "partitions": f"{ROOT}/data/01_raw/parts"}


def test_no_input_is_looked_for_under_a_local_root_or_when_the_catalog_reads_runtime_params(tmp_path) -> None:
    from kvx_runtime.compiler.loading import _remote_inputs

    configs = {"companies": {"type": "pandas.CSVDataset", "filepath": f"{ROOT}/data/companies.csv"}}
    assert _remote_inputs(_project(tmp_path / "plain"), configs, ROOT, written_paths={}) == {
        "companies": f"{ROOT}/data/companies.csv"}
    assert _remote_inputs(_project(tmp_path / "local"), {"c": {"filepath": "/srv/root/c.csv"}}, "/srv/root",
                          written_paths={}) == {}


def test_only_the_entries_that_read_runtime_params_are_left_out_when_that_can_be_told(tmp_path) -> None:
    # ${runtime_params:...} resolves to another path in a run than at compile time: such an entry
    # is not looked for; the others still are, unless the entries it feeds cannot be named.
    from kvx_runtime.compiler.loading import _remote_inputs

    configs = {"companies": {"type": "pandas.CSVDataset", "filepath": f"{ROOT}/data/companies.csv"},
               "day": {"type": "text.TextDataset", "filepath": f"{ROOT}/raw/today.txt"}}
    day = ("day:\n  type: text.TextDataset\n"
           "  filepath: ${storage_root}/raw/${runtime_params:day,today}.txt  # ${run_id} is a template\n")
    companies = "companies:\n  type: pandas.CSVDataset\n  filepath: ${storage_root}/data/companies.csv\n"
    only_companies = {"companies": f"{ROOT}/data/companies.csv"}
    assert _remote_inputs(_project(tmp_path / "entry", day + companies), configs, ROOT,
                          written_paths={}) == only_companies
    anchored = ("_day: &day\n  type: text.TextDataset\n  filepath: ${runtime_params:day}.txt\n"
                "day:\n  <<: *day\n" + companies)
    assert _remote_inputs(_project(tmp_path / "anchor", anchored), configs, ROOT, written_paths={}) == {}
    for name, catalog in {
        "variable": "_root: ${runtime_params:root,gs://bucket/root}\n"
                    "companies:\n  type: pandas.CSVDataset\n  filepath: ${_root}/data/companies.csv\n",
        "factory": '"{name}_day":\n  type: text.TextDataset\n  filepath: ${runtime_params:day}/{name}.txt\n'
                   + companies,
        "interpolation": day + "companies:\n  type: pandas.CSVDataset\n  filepath: ${_base}/companies.csv\n",
    }.items():
        assert _remote_inputs(_project(tmp_path / name, catalog), configs, ROOT, written_paths={}) == {}, name
    commented = "# filepath: ${runtime_params:day}\n" + companies
    assert _remote_inputs(_project(tmp_path / "comment", commented), configs, ROOT,
                          written_paths={}) == {**only_companies, "day": f"{ROOT}/raw/today.txt"}


def test_many_inputs_are_looked_for_a_few_at_a_time_each_answered(gcs_emulator) -> None:
    from kvx_runtime.submission import absent_inputs

    fs = gcs_emulator.filesystem()
    inputs = {f"table_{index:02d}": f"gs://{gcs_emulator.bucket}/many/table_{index:02d}.csv" for index in range(30)}
    for index in range(30):
        if index % 7:
            fs.pipe(inputs[f"table_{index:02d}"].removeprefix("gs://"), b"x\n")
    assert absent_inputs(inputs) == ["table_00", "table_07", "table_14", "table_21", "table_28"]


@pytest.mark.parametrize("value", ["soon", "0"])
def test_a_bad_wait_is_a_one_line_config_error_before_any_look_up(value, monkeypatch) -> None:
    from kvx_runtime.errors import ConfigError

    monkeypatch.setenv("KVX_INPUT_CHECK_TIMEOUT", value)
    with pytest.raises(ConfigError) as raised:
        refuse_missing_inputs({"companies": "kvx-no-such-protocol://bucket/companies.csv"})
    assert raised.value.exit_code == ExitCode.USAGE
    assert str(raised.value).startswith(f"KVX_INPUT_CHECK_TIMEOUT={value!r} is ") and "\n" not in str(raised.value)
