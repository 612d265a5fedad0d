"""A step attached to the pipeline's run over MLflow's REST API (kvx_runtime.mlflow.lean),
against a real MLflow server on 127.0.0.1: the run holds what MLflow's client and kedro-mlflow's
hooks would have written, and MLflow is imported only by code that wants it."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import yaml

from integration.conftest import AUDIENCE, make_project, run_step, step_env
from integration.test_mlflow import start

pytestmark = pytest.mark.slow

NODES = """
import sys

def describe(n, options, everything):
    return {"mlflow_imported": "mlflow" in sys.modules, "n": n}

def use_mlflow(n):
    import mlflow

    mlflow.log_metric("from_the_node", float(n))
    with mlflow.start_run(nested=True, run_name="trial") as trial:
        mlflow.log_param("trial_n", n)
    mlflow.start_run(nested=True, run_name="left-open")  # left open: the next node logs to the pipeline's run
    return trial.info.run_id

def thread_import(n):
    import threading

    importer = threading.Thread(target=lambda: __import__("mlflow"))  # a library's worker thread imports it
    importer.start()
    importer.join()
    import mlflow

    mlflow.log_metric("threaded", float(n))  # in the node's own thread
    return n

def sleepy(n):
    import time

    time.sleep(120)
    return n

def explode(n):
    raise ValueError(f"exploded with {n}")

def after(trial_id, n):
    import mlflow

    mlflow.log_metric("after_metric", float(n))
    return n
"""
PIPELINE = """
from kedro.pipeline import Node, Pipeline
from leanproj.nodes import after, describe, explode, sleepy, thread_import, use_mlflow

def register_pipelines():
    return {"__default__": Pipeline([
        Node(describe, ["params:n", "params:options", "parameters"], "described", name="describe"),
        Node(use_mlflow, "params:n", "trial_id", name="use_mlflow"),
        Node(after, ["trial_id", "params:n"], "done", name="after"),
        Node(explode, "params:n", "never", name="explode"),
        Node(thread_import, "params:n", "threaded", name="thread_import"),
        Node(sleepy, "described", "slept", name="sleepy"),
    ])}
"""
CATALOG = """
described:
  type: json.JSONDataset
  filepath: data/described.json
trial_id:
  type: json.JSONDataset
  filepath: data/trial.json
"""
PARAMETERS = {
    "n": 7,
    "options": {"depth": 3, "nested": {"rate": 0.5}, "api_key": "options-secret-value-kvx"},
    "long_text": "x" * 6500,
    "db_password": "password-param-value-kvx",
}


def lean_project(tmp_path: Path, *, strategy: str = "truncate", extra: dict | None = None,
                 disabled: tuple[str, ...] = ()) -> Path:
    project = make_project(tmp_path, "leanproj", NODES, PIPELINE, catalog=CATALOG,
                           vertexai=yaml.safe_dump({"run_config": {"image": "img", "root": str(tmp_path / "s"),
                                                                   **(extra or {})}}))
    (project / "conf" / "base" / "parameters.yml").write_text(yaml.safe_dump(PARAMETERS))
    (project / "conf" / "base" / "mlflow.yml").write_text(textwrap.dedent(f"""
        server:
          mlflow_tracking_uri: ${{mlflow_tracking_uri}}
        tracking:
          experiment:
            name: leanproj
          params:
            dict_params:
              flatten: true
            long_params_strategy: {strategy}
          disable_tracking:
            pipelines: {list(disabled)}
    """))
    return project


def step(project: Path, env: dict[str, str], job: str, run_id: str, *nodes: str, **extra: str):
    args = [arg for node in nodes for arg in ("--node", node)]
    return run_step(project, *args, "--run-id", f"{job}-uuid", "--job-name", job, "--mlflow-run-id", run_id,
                    env={**env, **extra})


def attached_over_rest(result) -> bool:
    return any(r.get("message") == "attached to the pipeline's MLflow run" and r.get("client") == "rest"
               for r in result.records)


@pytest.mark.parametrize("disabled", [(), ("__default__",)], ids=["tracked", "pipeline-disabled"])
def test_a_lean_step_writes_what_mlflows_client_and_kedro_mlflow_write(tmp_path, mlflow_server, disabled) -> None:
    project = lean_project(tmp_path, disabled=disabled)
    env = step_env(KEDRO_CONFIG_MLFLOW_TRACKING_URI=mlflow_server.url)
    client = mlflow_server.client()
    runs = {}
    for way in ("auto", "mlflow"):
        job = f"parity-{way}-{'disabled' if disabled else 'tracked'}"
        run_id = start(project, env, job, tmp_path)
        result = step(project, env, job, run_id, "describe", KVX_MLFLOW_CLIENT=way)
        assert result.returncode == 0, result.stderr[-3000:]
        assert attached_over_rest(result) is (way == "auto")
        runs[way] = client.get_run(run_id)
        described = (project / "data" / "described.json").read_text()
        assert ('"mlflow_imported": false' in described) is (way == "auto")  # nothing imported MLflow
        assert "password-param-value-kvx" not in result.stderr + result.stdout
    lean, full = runs["auto"], runs["mlflow"]
    assert lean.data.params == full.data.params
    assert lean.data.tags["kvx.last_node"] == "describe" and lean.info.status == "RUNNING"
    assert set(lean.data.metrics) == set(full.data.metrics) == {"kvx.node_seconds.describe"}
    if disabled:  # kedro-mlflow logs nothing for a pipeline whose tracking is disabled
        assert lean.data.params == {} and "kedro_command" not in lean.data.tags
        return
    assert lean.data.params["options.nested.rate"] == "0.5" and lean.data.params["n"] == "7"
    assert len(lean.data.params["parameters.long_text"]) == 6000  # truncated, as configured
    assert not [key for key in lean.data.params if "api_key" in key or "password" in key]  # the secret guard
    assert "options-secret-value-kvx" not in str(lean.data.params)
    skipped = {"vertexai_run_id", "vertexai_job_name", "kvx.create_token", "run_id", "session_id", "mlflow.runName"}
    assert {k: v for k, v in lean.data.tags.items() if k not in skipped} \
        == {k: v for k, v in full.data.tags.items() if k not in skipped}
    assert lean.data.tags["kedro_command"] == "kedro run --pipeline=__default__"


def test_node_code_that_imports_mlflow_logs_into_the_pipelines_run(tmp_path, mlflow_server) -> None:
    project = lean_project(tmp_path)
    env = step_env(KEDRO_CONFIG_MLFLOW_TRACKING_URI=mlflow_server.url, MLFLOW_EXPERIMENT_NAME="elsewhere")
    run_id = start(project, env, "import-job", tmp_path)
    result = step(project, env, "import-job", run_id, "use_mlflow", "after")
    assert result.returncode == 0, result.stderr[-3000:]
    assert attached_over_rest(result)
    client = mlflow_server.client()
    run = client.get_run(run_id)
    assert run.data.metrics["from_the_node"] == 7.0
    assert run.data.metrics["after_metric"] == 7.0  # not into the run use_mlflow left open
    assert run.data.params["n"] == "7"
    assert run.info.status == "RUNNING" and run.info.end_time is None  # still the pipeline's
    assert not any("left to MLFLOW_RUN_ID" in message for message in result.messages())
    import json

    trial = client.get_run(json.loads((project / "data" / "trial.json").read_text()))
    assert trial.data.tags["mlflow.parentRunId"] == run_id and trial.data.params["trial_n"] == "7"
    assert trial.info.experiment_id == run.info.experiment_id


def test_a_long_parameter_fails_or_becomes_a_tag_as_configured(tmp_path, mlflow_server) -> None:
    env = step_env(KEDRO_CONFIG_MLFLOW_TRACKING_URI=mlflow_server.url)
    failing = lean_project(tmp_path / "fail", strategy="fail")
    run_id = start(failing, env, "long-fail", tmp_path)
    result = step(failing, env, "long-fail", run_id, "describe")
    assert result.returncode == 1 and attached_over_rest(result)
    assert "Parameter 'parameters.long_text' length is 6500" in result.last_message
    assert "Traceback" not in result.last_message

    tagging = lean_project(tmp_path / "tag", strategy="tag")
    run_id = start(tagging, env, "long-tag", tmp_path)
    result = step(tagging, env, "long-tag", run_id, "describe")
    assert result.returncode == 0, result.stderr[-3000:]
    run = mlflow_server.client().get_run(run_id)
    assert run.data.tags["parameters.long_text"] == "x" * 6500
    assert "parameters.long_text" not in run.data.params and "parameters.db_password" not in run.data.tags


def test_a_changed_parameter_and_a_lost_server_are_told_as_with_mlflows_client(tmp_path, mlflow_server) -> None:
    from integration.faults import Forwarder

    project = lean_project(tmp_path)
    env = step_env(KEDRO_CONFIG_MLFLOW_TRACKING_URI=mlflow_server.url)
    run_id = start(project, env, "changed-job", tmp_path)
    assert step(project, env, "changed-job", run_id, "describe").returncode == 0
    changed = run_step(project, "--node", "describe", "--run-id", "changed-job-uuid", "--job-name", "changed-job",
                       "--mlflow-run-id", run_id, "--param", "n=8", env=env)
    assert changed.returncode == 2, changed.stderr[-2000:]
    assert "already logged with another value in this pipeline's MLflow run" in changed.last_message
    assert " n" in changed.last_message.split("already logged")[0]

    relay = Forwarder(mlflow_server.port).start()
    try:
        relayed = step_env(KEDRO_CONFIG_MLFLOW_TRACKING_URI=relay.url, MLFLOW_HTTP_REQUEST_MAX_RETRIES="0")
        relay.cut()
        lost = step(project, relayed, "changed-job", run_id, "describe")
    finally:
        relay.stop()
    assert lost.returncode == 3, lost.stderr[-2000:]
    assert f"MLflow at {relay.url}: the tracking server is unreachable" in lost.last_message
    assert "Traceback" not in lost.last_message


def test_a_step_with_kedro_mlflows_datasets_attaches_through_mlflows_client(tmp_path, mlflow_server) -> None:
    project = lean_project(tmp_path)
    with (project / "conf" / "base" / "catalog.yml").open("a") as catalog:
        catalog.write("done:\n  type: kedro_mlflow.io.metrics.MlflowMetricDataset\n")
    env = step_env(KEDRO_CONFIG_MLFLOW_TRACKING_URI=mlflow_server.url)
    run_id = start(project, env, "datasets-job", tmp_path)
    described = step(project, env, "datasets-job", run_id, "describe")
    assert described.returncode == 0 and attached_over_rest(described)  # its datasets are not kedro-mlflow's
    both = step(project, env, "datasets-job", run_id, "use_mlflow", "after")
    assert both.returncode == 0, both.stderr[-3000:]
    assert not attached_over_rest(both)
    assert mlflow_server.client().get_run(run_id).data.metrics["done"] == 7.0


def test_tokens_of_the_request_header_provider_sign_the_lean_requests(tmp_path, fake_google, bearer_proxy,
                                                                     mlflow_server) -> None:
    project = lean_project(tmp_path, extra={"mlflow": {"request_header_provider_params": {"client_id": AUDIENCE}}})
    host = fake_google.url.removeprefix("http://")
    env = step_env(KEDRO_CONFIG_MLFLOW_TRACKING_URI=bearer_proxy.url, GCE_METADATA_HOST=host,
                   GCE_METADATA_IP=host, NO_GCE_CHECK="False")
    env.pop("GOOGLE_APPLICATION_CREDENTIALS", None)
    run_id = start(project, env, "signed-job", tmp_path)
    rejected = len(bearer_proxy.rejected)
    result = step(project, env, "signed-job", run_id, "describe")
    assert result.returncode == 0, result.stderr[-3000:]
    assert attached_over_rest(result)
    assert len(bearer_proxy.rejected) == rejected  # every request carried a valid token
    assert mlflow_server.client().get_run(run_id).data.params["n"] == "7"


def test_the_rest_client_refreshes_a_rejected_token_once(tmp_path, fake_google, bearer_proxy, monkeypatch) -> None:
    from integration.test_mlflow import _service_account_key
    from kvx_runtime.auth import install_request_header_provider, uninstall_request_header_provider
    from kvx_runtime.config import MLflowConfig
    from kvx_runtime.mlflow.rest_client import MlflowRestClient, MlflowRestError

    key = _service_account_key(tmp_path / "key.json", f"{fake_google.url}/token",
                               "caller@kvx-test.iam.gserviceaccount.com")
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(key))
    client = MlflowRestClient(bearer_proxy.url)
    with pytest.raises(MlflowRestError) as refused:  # no provider: no token
        client.get_run("0" * 32)
    assert refused.value.status == 401 and "UNAUTHENTICATED" in str(refused.value)
    install_request_header_provider(MLflowConfig(request_header_provider_params={"client_id": AUDIENCE}))
    try:
        with pytest.raises(MlflowRestError) as missing:
            client.get_run("0" * 32)
        assert missing.value.error_code == "RESOURCE_DOES_NOT_EXIST"
        first = set(bearer_proxy.tokens_seen)
        bearer_proxy.revoked |= first
        rejected = len(bearer_proxy.rejected)
        with pytest.raises(MlflowRestError) as again:
            client.get_run("0" * 32)  # 401, a new token, retried
        assert again.value.error_code == "RESOURCE_DOES_NOT_EXIST"
        assert len(bearer_proxy.rejected) == rejected + 1 and bearer_proxy.tokens_seen - first
    finally:
        uninstall_request_header_provider()


def test_a_failed_node_is_tagged_on_the_pipelines_run(tmp_path, mlflow_server) -> None:
    project = lean_project(tmp_path)
    env = step_env(KEDRO_CONFIG_MLFLOW_TRACKING_URI=mlflow_server.url)
    run_id = start(project, env, "explode-job", tmp_path)
    result = step(project, env, "explode-job", run_id, "explode")
    assert result.returncode == 1 and attached_over_rest(result)
    assert "node 'explode' raised ValueError: exploded with 7" in result.last_message
    run = mlflow_server.client().get_run(run_id)
    assert run.data.tags["kvx.failed_node"] == "explode" and run.data.params["n"] == "7"
    assert run.info.status == "RUNNING"


def test_mlflow_imported_in_another_thread_still_logs_into_the_pipelines_run(tmp_path, mlflow_server) -> None:
    project = lean_project(tmp_path)
    env = step_env(KEDRO_CONFIG_MLFLOW_TRACKING_URI=mlflow_server.url)
    run_id = start(project, env, "thread-job", tmp_path)
    result = step(project, env, "thread-job", run_id, "thread_import")
    assert result.returncode == 0 and attached_over_rest(result), result.stderr[-3000:]
    client = mlflow_server.client()
    run = client.get_run(run_id)
    assert run.data.metrics["threaded"] == 7.0 and run.info.status == "RUNNING"
    others = client.search_runs([run.info.experiment_id], filter_string="metrics.threaded = 7")
    assert [other.info.run_id for other in others] == [run_id]  # no run of its own


@pytest.mark.parametrize("way", ["auto", "mlflow"])
def test_a_stopped_step_ends_without_waiting_on_mlflow(tmp_path, mlflow_server, way) -> None:
    """SIGTERM (a preempted machine): the finished nodes are not written on the way out, whose
    requests and retries could outlast the orchestrator's grace period (then SIGKILL, no verdict)."""
    import signal
    import subprocess

    from integration.conftest import KVX
    from integration.fakes import RecordingProxy

    proxy = RecordingProxy(mlflow_server.port).start()
    try:
        project = lean_project(tmp_path)
        env = step_env(KEDRO_CONFIG_MLFLOW_TRACKING_URI=proxy.url, KVX_MLFLOW_CLIENT=way)
        run_id = start(project, env, f"stopped-{way}", tmp_path)
        process = subprocess.Popen(
            [*KVX, "exec-node", "--node", "describe", "--node", "sleepy", "--run-id", f"stopped-{way}-uuid",
             "--job-name", f"stopped-{way}", "--mlflow-run-id", run_id, "--storage-root", str(tmp_path / "s")],
            cwd=project, env=env, stderr=subprocess.PIPE, text=True)
        assert process.stderr is not None
        for line in process.stderr:
            if '"node started"' in line and "sleepy" in line:
                break
        process.send_signal(signal.SIGTERM)
        _, rest = process.communicate(timeout=120)
    finally:
        proxy.stop()
    assert process.returncode == 143, rest[-2000:]
    assert "the step is stopping: its finished nodes are not recorded in the MLflow run" in rest
    assert not [body for _, path, body in proxy.requests if "kvx.node_seconds" in body]
    assert mlflow_server.client().get_run(run_id).info.status == "RUNNING"
