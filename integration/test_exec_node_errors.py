"""exec-node's unhappy paths: each gives its documented exit code and one clear last line,
never a raw traceback from kvx-runtime, and leaves no partial data behind."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import pytest

from conftest import free_port
from integration.conftest import (
    KVX,
    make_project,
    make_slow_pickling_project,
    make_slow_project,
    run_step,
    signal_after_node_started,
    step_env,
)
from kvx_runtime.storage.store import BlobStore

pytestmark = pytest.mark.slow

FIRST = "data_processing.preprocess_companies_node"
TABLE = "data_processing.create_model_input_table_node"


@pytest.mark.kedro
def test_unknown_node_exits_2_and_suggests_names(example_project: Path, tmp_path) -> None:
    result = run_step(example_project, "--node", "train_model_node", "--storage-root", str(tmp_path))
    assert result.returncode == 2
    assert "has no node 'train_model_node'" in result.last_message
    assert "data_science.train_model_node" in result.last_message
    assert "Traceback" not in result.stderr


@pytest.mark.kedro
def test_unknown_pipeline_exits_2(example_project: Path, tmp_path) -> None:
    result = run_step(example_project, "--node", FIRST, "--pipeline", "data_sciense")
    assert result.returncode == 2
    assert "no pipeline named 'data_sciense'" in result.last_message
    assert "data_science" in result.last_message


@pytest.mark.parametrize(("root", "problem"), [
    ("", "the storage root is empty"),
    ("gs://", "names no bucket"),
    ("file://", "needs an absolute path"),
    ("http://example.com/bucket", "unsupported scheme http://"),
])
def test_a_storage_root_that_is_not_one_exits_2(example_project: Path, root: str, problem: str) -> None:
    # Never a silent fallback to run_config.root or to the working directory.
    result = run_step(example_project, "--node", FIRST, "--storage-root", root)
    assert result.returncode == 2, result.stderr[-2000:]
    assert problem in result.last_message and "gs://bucket[/prefix]" in result.last_message
    assert not (example_project / "kedro-vertexai-temp").exists()
    assert "Traceback" not in result.stderr


@pytest.mark.kedro
def test_missing_upstream_blob_names_dataset_path_and_producer(example_project: Path, tmp_path) -> None:
    result = run_step(example_project, "--node", TABLE, "--run-id", "m", "--storage-root", str(tmp_path))
    assert result.returncode == 2
    message = result.last_message
    assert "'preprocessed_shuttles'" in message or "'data_processing.preprocessed_companies'" in message
    assert str(tmp_path / "kedro-vertexai-temp" / "m") in message
    assert "produced by node 'data_processing.preprocess_" in message
    assert "Traceback" not in result.stderr


def test_two_runs_sharing_a_job_directory_are_refused_naming_both(example_project: Path, tmp_path) -> None:
    first = run_step(example_project, "--node", FIRST, "--run-id", "run-a", "--job-name", "shared",
                     "--storage-root", str(tmp_path))
    assert first.returncode == 0, first.stderr[-2000:]
    blobs = sorted((tmp_path / "kedro-vertexai-temp" / "shared").glob("*.bin"))
    written = [blob.read_bytes() for blob in blobs]
    assert blobs
    # Another run with the same job name: reading run-a's intermediates would mix two runs.
    second = run_step(example_project, "--node", TABLE, "--run-id", "run-b", "--job-name", "shared",
                      "--storage-root", str(tmp_path))
    assert second.returncode == 2, second.stderr[-2000:]
    assert "belongs to run run-a, not to this run (run-b)" in second.last_message
    assert "Traceback" not in second.stderr
    # Nor may it overwrite them.
    again = run_step(example_project, "--node", FIRST, "--run-id", "run-b", "--job-name", "shared",
                     "--storage-root", str(tmp_path))
    assert again.returncode == 2 and [blob.read_bytes() for blob in blobs] == written


def test_corrupt_blob_exits_2_naming_dataset_and_path(example_project: Path, tmp_path) -> None:
    root = str(tmp_path)
    assert run_step(example_project, "--node", FIRST, "--run-id", "c", "--storage-root", root).returncode == 0
    path = Path(BlobStore(root, "c").path("data_processing.preprocessed_companies"))
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    # The other input is fine.
    assert run_step(example_project, "--node", "data_processing.preprocess_shuttles_node", "--run-id", "c",
                    "--storage-root", root).returncode == 0
    result = run_step(example_project, "--node", TABLE, "--run-id", "c", "--storage-root", root)
    assert result.returncode == 2
    assert "'data_processing.preprocessed_companies'" in result.last_message
    assert str(path) in result.last_message
    assert "corrupt" in result.last_message
    assert "Traceback" not in result.stderr and "UnpicklingError" not in result.stderr


def test_bad_vertexai_config_exits_2_with_key_path(example_project: Path) -> None:
    config = example_project / "conf" / "base" / "vertexai.yml"
    config.write_text(config.read_text().replace("dynamic_config_providers: []",
                                                 "dynamic_config_providers: [{params: {}}]"))
    result = run_step(example_project, "--node", FIRST)
    assert result.returncode == 2
    assert "run_config.dynamic_config_providers.0.cls: required key is missing" in result.last_message


def test_no_storage_root_exits_2_only_when_needed(example_project: Path) -> None:
    config = example_project / "conf" / "base" / "vertexai.yml"
    config.write_text(config.read_text().replace("  root: kvx-example-bucket/pipelines\n", ""))
    result = run_step(example_project, "--node", FIRST)
    assert result.returncode == 2
    assert "no storage root is set" in result.last_message


@pytest.mark.kedro
def test_failing_node_exits_1_with_its_traceback_once(example_project: Path, tmp_path) -> None:
    root = str(tmp_path)
    for node in [FIRST, "data_processing.preprocess_shuttles_node", TABLE]:
        assert run_step(example_project, "--node", node, "--run-id", "f", "--storage-root", root).returncode == 0
    result = run_step(example_project, "--node", "data_science.split_data_node", "--run-id", "f",
                      "--storage-root", root, "--param", "data_science.model_options.test_size=7.5")
    assert result.returncode == 1
    assert result.stderr.count("Traceback (most recent call last)") == 1
    last = result.records[-1]
    assert last["severity"] == "ERROR"
    assert "node 'data_science.split_data_node' raised" in last["message"]
    assert "replay: kvx-runtime exec-node --node data_science.split_data_node" in last["message"]
    assert "--param data_science.model_options.test_size=7.5" in last["message"]
    assert not (tmp_path / "kedro-vertexai-temp" / "f" / "data_science.X_train.bin").exists()


@pytest.mark.kedro
def test_undefined_placeholder_exits_2_naming_file(example_project: Path, tmp_path) -> None:
    catalog = example_project / "conf" / "base" / "catalog.yml"
    catalog.write_text(catalog.read_text().replace("${commit_id|dirty}", "${commit_sha}"))
    result = run_step(example_project, "--node", FIRST, "--storage-root", str(tmp_path))
    assert result.returncode == 2
    assert "${commit_sha}" in result.last_message and "catalog.yml" in result.last_message
    assert "KEDRO_CONFIG_COMMIT_SHA" in result.last_message


@pytest.mark.kedro
def test_opt_out_of_templating_warns_and_leaves_placeholders(example_project: Path, tmp_path) -> None:
    # A project that does not name the loader in settings.py (the example does, for kedro run).
    settings = example_project / "src" / "spaceflights_kvx" / "settings.py"
    settings.write_text('CONFIG_LOADER_ARGS = {"base_env": "base", "default_run_env": "local"}\n')
    env = step_env(KEDRO_VERTEXAI_DISABLE_CONFIG_HOOK="true")
    result = run_step(example_project, "--node", FIRST, "--storage-root", str(tmp_path), "--env", "base",
                      env=env)
    assert any("KEDRO_VERTEXAI_DISABLE_CONFIG_HOOK environment variable is set" in m
               for m in result.messages())
    # Kedro's own loader cannot fill ${run_id}: the catalog cannot be built.
    assert result.returncode == 2
    assert "run_id" in result.last_message


def test_unreachable_storage_exits_3(example_project: Path) -> None:
    port = free_port()  # nothing listens there
    # A small give-up budget: gcsfs's own request retries end with it too.
    env = step_env(STORAGE_EMULATOR_HOST=f"http://127.0.0.1:{port}", KVX_STORAGE_RETRY_BUDGET="4")
    result = run_step(example_project, "--node", FIRST, "--storage-root", "gs://bucket/root", env=env)
    assert result.returncode == 3
    # The step's first storage operation: recording the run that owns the job directory.
    assert "could not record gs://bucket/root/kedro-vertexai-temp/" in result.last_message
    assert result.records[-1]["exit_code"] == 3
    # The verdict is the only error: no library tracebacks before it.
    errors = [r for r in result.records if r.get("severity") == "ERROR"]
    assert errors == [result.records[-1]], [e["message"][:200] for e in errors]
    assert "Traceback" not in result.stderr




# --- what no retry can change: exit 2 at once, naming the cause ------------------------------

def _exits_2_at_once(result, *expected: str) -> None:
    assert result.returncode == 2, result.stderr[-3000:]
    for text in expected:
        assert text in result.last_message, result.last_message
    assert result.records[-1]["exit_code"] == 2
    assert "Traceback" not in result.stderr
    assert not [m for m in result.messages() if "retrying" in m]


def test_a_memory_root_is_refused(example_project: Path) -> None:
    result = run_step(example_project, "--node", FIRST, "--storage-root", "memory://kvx", timeout=60)
    _exits_2_at_once(result, "storage root 'memory://kvx'", "inside one process")


def test_a_root_that_is_a_file_is_refused(example_project: Path, tmp_path: Path) -> None:
    root = tmp_path / "not-a-directory"
    root.write_text("x")
    result = run_step(example_project, "--node", FIRST, "--storage-root", str(root), timeout=60)
    _exits_2_at_once(result, f"storage root {root} cannot hold intermediates", "Not a directory")


def test_a_malformed_credentials_file_is_named_not_replaced_by_anonymous_access(
        example_project: Path, tmp_path: Path, gcs_emulator) -> None:
    key = tmp_path / "key.json"
    key.write_text('{"type": "service_account", "client_email": "x@y", "private_key": "-----BEGIN PRIV')
    env = step_env(GOOGLE_APPLICATION_CREDENTIALS=str(key), GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="false")
    result = run_step(example_project, "--node", FIRST, "--storage-root", f"gs://{gcs_emulator.bucket}/creds",
                      env=env, timeout=60)
    _exits_2_at_once(result, f"GOOGLE_APPLICATION_CREDENTIALS ({key}) is not a usable Google credentials file")
    assert "BEGIN PRIV" not in result.stderr


class _RevokedKeyTokenEndpoint:
    """A token endpoint that answers every grant as Google does for a deleted or revoked key."""

    def __init__(self) -> None:
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        endpoint = self
        self.requests = 0

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *_: object) -> None:
                pass

            def do_POST(self) -> None:
                endpoint.requests += 1
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                body = b'{"error": "invalid_grant", "error_description": "Invalid JWT Signature."}'
                self.send_response(400)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/token"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def test_a_revoked_key_is_exit_2_at_once(example_project: Path, tmp_path: Path, gcs_emulator) -> None:
    """The token endpoint answers invalid_grant: no retry can help (gcsfs used to retry it for
    ~35 s per request, then we did, 206 s in all, and called it transient: exit 3)."""
    from integration.test_mlflow import _service_account_key

    endpoint = _RevokedKeyTokenEndpoint()
    try:
        key = _service_account_key(tmp_path / "key.json", endpoint.url, "steps@kvx-test.iam.gserviceaccount.com")
        env = step_env(GOOGLE_APPLICATION_CREDENTIALS=str(key), GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="false")
        result = run_step(example_project, "--node", FIRST, "--storage-root",
                          f"gs://{gcs_emulator.bucket}/revoked", env=env, timeout=60)
    finally:
        endpoint.stop()
    _exits_2_at_once(result, "refused this step's credentials", "invalid_grant")
    assert 1 <= endpoint.requests <= 3  # google-auth's own tries, nothing more


@pytest.mark.parametrize(("signum", "code"), [pytest.param(signal.SIGTERM, 143, marks=pytest.mark.kedro),
                                             (signal.SIGINT, 130)])
def test_signal_during_a_long_node_stops_cleanly(tmp_path: Path, signum: int, code: int) -> None:
    project = make_slow_project(tmp_path, "sigproj")
    root = tmp_path / "storage"
    assert run_step(project, "--node", "make", "--run-id", "s", "--storage-root", str(root)).returncode == 0
    process = subprocess.Popen(
        [*KVX, "exec-node", "--node", "slow", "--run-id", "s", "--storage-root", str(root)],
        cwd=project, env=step_env(), stderr=subprocess.PIPE, text=True,
    )
    rest = signal_after_node_started(process, signum)
    assert process.returncode == code
    assert "nothing partial was left behind" in rest.splitlines()[-1]
    assert sorted(p.name for p in (root / "kedro-vertexai-temp" / "s").iterdir()) == ["owner.json", "values.bin"]


def test_a_long_node_keeps_its_job_alive_for_gc(tmp_path: Path) -> None:
    """While a node runs, its step records its activity in the job directory again and again:
    gc (past the ttl of every blob there) keeps the job whose step is still running."""
    import json
    import os
    import time

    project = make_slow_project(tmp_path, "beatproj")
    root = tmp_path / "storage"
    assert run_step(project, "--node", "make", "--run-id", "b", "--storage-root", str(root)).returncode == 0
    job = root / "kedro-vertexai-temp" / "b"
    two_hours_ago = time.time() - 7200
    for path in job.iterdir():
        os.utime(path, (two_hours_ago, two_hours_ago))
    process = subprocess.Popen(
        [*KVX, "exec-node", "--node", "slow", "--run-id", "b", "--storage-root", str(root)],
        cwd=project, env=step_env(KVX_HEARTBEAT_INTERVAL="1"), stderr=subprocess.PIPE, text=True,
    )
    record = job / "activity" / "slow.json"
    try:
        deadline = time.monotonic() + 60
        while not record.exists() and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.1)
        assert record.exists(), "no activity record while the node ran"
        first = json.loads(record.read_text())["at"]
        while json.loads(record.read_text())["at"] == first and time.monotonic() < deadline:
            time.sleep(0.1)  # written again, not once
        assert json.loads(record.read_text())["at"] > first
        kept = subprocess.run([*KVX, "gc", "--storage-root", str(root), "--older-than", "3600", "--yes"],
                              cwd=project, env=step_env(), capture_output=True, text=True, timeout=120)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.communicate(timeout=60)
        except subprocess.TimeoutExpired:  # never left running past the test
            process.kill()
            process.communicate()
            raise
    assert kept.returncode == 0, kept.stderr[-2000:]
    assert "0 expired job(s)" in kept.stdout and (job / "values.bin").exists()


def test_sigterm_during_a_gs_upload_exits_143_and_leaves_no_blob(tmp_path: Path, gcs_emulator) -> None:
    """A stop signal wins, at once, over an upload session that cannot be cancelled (every
    DELETE of the session fails here, as it did when the trials measured exit 3)."""
    from integration.faults import FaultPlan, FaultProxy

    project = make_slow_pickling_project(tmp_path, "uploadsig")
    proxy = FaultProxy(gcs_emulator.port, FaultPlan(always=[(lambda method, _: method == "DELETE", "503")])).start()
    root = f"gs://{gcs_emulator.bucket}/sigterm"
    env = step_env(STORAGE_EMULATOR_HOST=proxy.url, GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="false",
                   KVX_STORAGE_BLOCK_SIZE=str(256 * 1024))
    try:
        process = subprocess.Popen(
            [*KVX, "exec-node", "--node", "make", "--run-id", "u", "--storage-root", root],
            cwd=project, env=env, stderr=subprocess.PIPE, text=True,
        )
        rest = signal_after_node_started(process, signal.SIGTERM, event="node finished", delay=2.0)
    finally:
        proxy.stop()
    assert process.returncode == 143, rest[-2000:]
    assert "stopped by SIGTERM" in rest.splitlines()[-1]
    assert proxy.injected["503"] == 0  # no time spent cancelling the session
    fs = gcs_emulator.filesystem()
    assert not fs.exists(f"{gcs_emulator.bucket}/sigterm/kedro-vertexai-temp/u/payload.bin")



def test_sigkill_mid_write_leaves_a_temp_file_that_the_next_step_removes(tmp_path: Path) -> None:
    project = make_slow_pickling_project(tmp_path, "killproj")
    root = tmp_path / "storage"
    process = subprocess.Popen(
        [*KVX, "exec-node", "--node", "make", "--run-id", "k", "--storage-root", str(root)],
        cwd=project, env=step_env(), stderr=subprocess.PIPE, text=True,
    )
    signal_after_node_started(process, signal.SIGKILL, event="node finished", delay=2.0)
    job_dir = root / "kedro-vertexai-temp" / "k"
    leftovers = [p.name for p in job_dir.iterdir() if p.name != "owner.json"]
    assert len(leftovers) == 1 and leftovers[0].startswith(".payload.bin.") and leftovers[0].endswith(".tmp")
    assert not (job_dir / "payload.bin").exists()  # never a partial blob under the final name

    # `gc` sees it (dry run), then the next step of the job removes it.
    listed = subprocess.run([*KVX, "gc", "--storage-root", str(root), "--older-than", "86400"], cwd=project,
                            env=step_env(), capture_output=True, text=True)
    assert listed.returncode == 0 and f"would delete temporary file of a dead writer: k/{leftovers[0]}" in listed.stdout
    reader = run_step(project, "--node", "count", "--run-id", "k", "--storage-root", str(root))
    assert reader.returncode == 2 and "payload" in reader.last_message  # the blob was never written
    assert [p.name for p in job_dir.iterdir()] == ["owner.json"]  # the run's record, no blob


_EXITING_NODES = """
import sys


def make():
    return 1


def leave(value, code):
    sys.exit(code)
"""
_EXITING_PIPELINE = """
from kedro.pipeline import Pipeline, node

from .nodes import leave, make


def register_pipelines():
    return {"__default__": Pipeline([node(make, None, "value", name="make"),
                                     node(leave, ["value", "params:code"], "out", name="leave")])}
"""


@pytest.mark.kedro
@pytest.mark.parametrize("code", [0, 3])
def test_a_node_that_calls_sys_exit_fails_the_step_with_exit_1_whatever_the_code(tmp_path: Path, code: int) -> None:
    # sys.exit(0) in a node must never tell the orchestrator the step succeeded (its outputs
    # never saved), nor sys.exit(3) that it is worth a retry.
    project = make_project(tmp_path, "exitproj", _EXITING_NODES, _EXITING_PIPELINE)
    (project / "conf" / "base" / "parameters.yml").write_text(f"code: {code}\n")
    root = str(tmp_path / "storage")
    assert run_step(project, "--node", "make", "--run-id", "e", "--storage-root", root).returncode == 0
    result = run_step(project, "--node", "leave", "--run-id", "e", "--storage-root", root,
                      "--param", "api_key=ab'cd-kvx-secret")
    assert result.returncode == 1, result.stderr[-2000:]
    last = result.records[-1]
    assert f"node 'leave' called sys.exit({code})" in last["message"]
    assert "replay: kvx-runtime exec-node --node leave" in last["message"]
    # The replay's secret is masked before it is quoted (a quote in it split it around the mask).
    assert "cd-kvx-secret" not in result.stderr and "'api_key=[redacted]'" in last["message"]


def test_storage_that_accepts_and_never_answers_exits_3_within_the_budget(example_project: Path) -> None:
    # A half-open connection (a network black hole): gcsfs waits for an answer without any limit
    # of its own; the step must give up within its budget, not at the orchestrator's timeout.
    import socket
    import threading
    import time

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    held: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                held.append(listener.accept()[0])  # accepted, never answered
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    try:
        env = step_env(STORAGE_EMULATOR_HOST=f"http://127.0.0.1:{listener.getsockname()[1]}",
                       KVX_STORAGE_RETRY_BUDGET="4", KVX_STORAGE_STALL_TIMEOUT="1")
        started = time.monotonic()
        result = run_step(example_project, "--node", FIRST, "--storage-root", "gs://bucket/root", env=env,
                          timeout=120)
        assert result.returncode == 3, result.stderr[-2000:]
        assert time.monotonic() - started < 60 and held
        assert "Traceback" not in result.stderr
    finally:
        listener.close()
        for connection in held:
            connection.close()


@pytest.mark.kedro
def test_a_string_parameter_that_only_looks_like_json_is_text_and_a_list_still_refuses_it(
        example_project: Path, tmp_path: Path) -> None:
    root = str(tmp_path / "storage")
    for value in ("{date}_report", "[A-Z]+ shuttles"):
        ran = run_step(example_project, "--node", FIRST, "--run-id", "j", "--storage-root", root,
                       "--param", f"reporting.title={value}")
        assert ran.returncode == 0, ran.stderr[-2000:]
    refused = run_step(example_project, "--node", FIRST, "--run-id", "j", "--storage-root", root,
                       "--param", "data_science.model_options.features=[engines")
    _exits_2_at_once(refused, "data_science.model_options.features")
