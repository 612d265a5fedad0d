"""One MLflow run per pipeline, against real MLflow servers on 127.0.0.1, with each auth mode.

Servers: a plain `mlflow server` (sqlite), the same behind a bearer-token proxy (ID tokens
from a fake GCE metadata server, a fake IAM Credentials API, or a self-made service-account
key whose token_uri is local), and MLflow's basic-auth app.
"""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from integration.conftest import (
    ADMIN_PASSWORD,
    ADMIN_USER,
    AUDIENCE,
    KVX,
    make_project,
    run_step,
    step_env,
)

pytestmark = pytest.mark.slow

ML_NODES = """
import time

def make(n):
    return list(range(n))

def train(values, lr):
    model = {"weights": [v * lr for v in values]}
    return model, float(sum(model["weights"]))

def wait_then_score(model, seconds):
    time.sleep(seconds)
    return {"late_score": {"value": float(len(model["weights"])), "step": 1}}

def report(model, limit):
    if len(model["weights"]) > limit:
        raise ValueError(f"model too large: {len(model['weights'])} > {limit}")
    return f"weights: {model['weights']}"
"""
ML_PIPELINE = """
from kedro.pipeline import Node, Pipeline
from mlproj.nodes import make, report, train, wait_then_score

def register_pipelines():
    pipe = Pipeline([
        Node(make, "params:n", "values", name="make"),
        Node(train, ["values", "params:lr"], ["model", "score"], name="train"),
        Node(wait_then_score, ["model", "params:wait_seconds"], "late_metrics", name="wait_then_score"),
        Node(report, ["model", "params:limit"], "report", name="report"),
    ])
    return {"__default__": pipe}
"""
ML_CATALOG = """
score:
  type: kedro_mlflow.io.metrics.MlflowMetricDataset
late_metrics:
  type: kedro_mlflow.io.metrics.MlflowMetricsHistoryDataset
report:
  type: kedro_mlflow.io.artifacts.MlflowArtifactDataset
  dataset:
    type: text.TextDataset
    filepath: data/report.txt
"""


def ml_project(tmp_path: Path, mlflow_params: dict | None = None, *, required: bool = True,
               wait_seconds: float = 0.0, limit: int = 100) -> Path:
    mlflow_section = {"required": required}
    if mlflow_params is not None:
        mlflow_section["request_header_provider_params"] = mlflow_params
    project = make_project(
        tmp_path, "mlproj", ML_NODES, ML_PIPELINE, catalog=ML_CATALOG,
        vertexai=yaml.safe_dump({"run_config": {"image": "img", "root": str(tmp_path / "storage"),
                                                "mlflow": mlflow_section}}),
    )
    (project / "conf" / "base" / "parameters.yml").write_text(
        f"n: 4\nlr: 0.5\nwait_seconds: {wait_seconds}\nlimit: {limit}\n")
    (project / "conf" / "base" / "mlflow.yml").write_text(textwrap.dedent("""
        server:
          mlflow_tracking_uri: ${mlflow_tracking_uri}
        tracking:
          experiment:
            name: mlproj
    """))
    return project


def kvx(project: Path, *args: str, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*KVX, *args], cwd=project, env=env, capture_output=True, text=True, timeout=timeout)


def last_json(stderr: str) -> dict:
    lines = [line for line in stderr.splitlines() if line.startswith("{")]
    return json.loads(lines[-1]) if lines else {"message": stderr[-500:]}


def start(project: Path, env: dict[str, str], job: str, tmp_path: Path) -> str:
    output = tmp_path / "out" / f"{job}.txt"
    result = kvx(project, "mlflow-start", "--run-id", f"{job}-uuid", "--job-name", job,
                 "--output", str(output), env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    run_id = output.read_text()
    assert result.stdout.strip() == run_id
    return run_id


def run_all(project: Path, env: dict[str, str], job: str, mlflow_run_id: str | None, nodes: list[str]):
    results = []
    for node in nodes:
        args = ["--node", node, "--run-id", f"{job}-uuid", "--job-name", job]
        if mlflow_run_id:
            args += ["--mlflow-run-id", mlflow_run_id]
        results.append(run_step(project, *args, env=env))
    return results


def end(project: Path, env: dict[str, str], job: str, state: str, message: str | None = None):
    status = {"state": state, "pipelineJobResourceName": f"projects/p/locations/l/pipelineJobs/{job}",
              "pipelineTaskName": "exit-handler-1"}
    if message:
        status["error"] = {"code": 9, "message": message}
    return kvx(project, "mlflow-end", "--job-name", job, "--final-status", json.dumps(status), env=env)


EXAMPLE_NODES = [
    "data_processing.preprocess_companies_node", "data_processing.preprocess_shuttles_node",
    "data_processing.create_model_input_table_node", "reporting.summarize_shuttles_node",
    "data_science.split_data_node", "data_science.fit_scaler_node", "data_science.train_model_node",
    "data_science.evaluate_model_node", "reporting.feature_importance_node", "reporting.build_report_node",
]


def test_one_run_holds_every_step_of_the_example_pipeline(example_project, mlflow_server, tmp_path) -> None:
    # The example project's MLflow setup is in its laptop env, conf/local.
    env = step_env(KEDRO_CONFIG_MLFLOW_TRACKING_URI=mlflow_server.url, KEDRO_ENV="local")
    job = "example-job-1"
    run_id = start(example_project, env, job, tmp_path)
    client = mlflow_server.client()
    for node in EXAMPLE_NODES:
        result = run_step(example_project, "--node", node, "--run-id", "example-uuid", "--job-name", job,
                          "--storage-root", str(tmp_path / "storage"), "--mlflow-run-id", run_id, env=env)
        assert result.returncode == 0, f"{node}: {result.stderr[-3000:]}"
        run = client.get_run(run_id)
        assert run.info.status == "RUNNING", f"after {node}"
        assert run.info.run_name == job
        assert run.data.tags["kvx.last_node"] == node
    ended = end(example_project, env, job, "SUCCEEDED")
    assert ended.returncode == 0, ended.stderr[-2000:]

    experiment = client.get_experiment_by_name("spaceflights-kvx")
    runs = client.search_runs([experiment.experiment_id], filter_string=f"tags.vertexai_job_name = '{job}'")
    assert [r.info.run_id for r in runs] == [run_id]  # exactly one run for the pipeline
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == job
    assert run.data.tags["vertexai_run_id"] == f"{job}-uuid"
    assert run.data.tags["kvx.final_state"] == "SUCCEEDED"
    assert run.data.tags["kedro_command"] == "kedro run --pipeline=__default__"  # the pipeline's, not a step's
    assert run.data.params["data_science.model_options.test_size"] == "0.2"
    assert run.data.params["reporting.top_n"] == "3"
    assert set(run.data.metrics) == {"metrics.r2_score", "metrics.mae", "metrics.max_error", "metrics.test_rows",
                                     *(f"kvx.node_seconds.{node}" for node in EXAMPLE_NODES)}
    assert [a.path for a in client.list_artifacts(run_id)] == ["report_dirty.md"]


@pytest.mark.kedro
def test_exec_node_finds_the_run_by_job_name(tmp_path, mlflow_server) -> None:
    project = ml_project(tmp_path)
    env = step_env(KEDRO_CONFIG_MLFLOW_TRACKING_URI=mlflow_server.url)
    run_id = start(project, env, "by-tag-job", tmp_path)
    results = run_all(project, env, "by-tag-job", None, ["make", "train"])
    assert all(r.returncode == 0 for r in results), results[-1].stderr[-2000:]
    run = mlflow_server.client().get_run(run_id)
    assert run.data.metrics["score"] == 3.0 and run.data.params["lr"] == "0.5"
    # Retrying a step logs the same params again: no error.
    again = run_all(project, env, "by-tag-job", None, ["train"])[0]
    assert again.returncode == 0, again.stderr[-2000:]


def test_a_step_leaves_the_runs_status_as_it_finds_it(tmp_path, mlflow_server) -> None:
    # A run ended outside the pipeline (here killed by hand, with no kvx.final_state): a step
    # attaching to it logs into it and leaves it KILLED, where resuming it as RUNNING left it so.
    project = ml_project(tmp_path)
    env = step_env(KEDRO_CONFIG_MLFLOW_TRACKING_URI=mlflow_server.url)
    run_id = start(project, env, "killed-job", tmp_path)
    client = mlflow_server.client()
    client.set_terminated(run_id, "KILLED")
    results = run_all(project, env, "killed-job", run_id, ["make", "train"])
    assert all(r.returncode == 0 for r in results), results[-1].stderr[-2000:]
    run = client.get_run(run_id)
    assert run.info.status == "KILLED"
    assert run.data.metrics["score"] == 3.0 and run.data.tags["kvx.last_node"] == "train"


def test_with_system_metrics_a_step_resumes_the_run_and_puts_back_its_final_status(tmp_path, mlflow_server) -> None:
    # MLflow's own start_run (it starts the system metrics monitor), which sets the run RUNNING:
    # the step puts back the status mlflow-end recorded.
    project = ml_project(tmp_path)
    env = step_env(KEDRO_CONFIG_MLFLOW_TRACKING_URI=mlflow_server.url, MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING="true")
    run_id = start(project, env, "metrics-job", tmp_path)
    ended = end(project, env, "metrics-job", "SUCCEEDED")
    assert ended.returncode == 0, ended.stderr[-2000:]
    [result] = run_all(project, env, "metrics-job", run_id, ["make"])
    assert result.returncode == 0, result.stderr[-2000:]
    assert "its final status is kept" in result.stderr
    assert mlflow_server.client().get_run(run_id).info.status == "FINISHED"


@pytest.mark.kedro
def test_steps_tag_the_run_as_the_pipelines_and_only_once(tmp_path, mlflow_server) -> None:
    # kedro-mlflow tags the active run with its session's run parameters in every step: the
    # pipeline's run said what its last step ran (kedro run --node=<one node>, that step's Kedro
    # session and runner), in two requests a step.
    from integration.fakes import RecordingProxy

    proxy = RecordingProxy(mlflow_server.port).start()
    try:
        project = ml_project(tmp_path)
        env = step_env(KEDRO_CONFIG_MLFLOW_TRACKING_URI=proxy.url)
        run_id = start(project, env, "tags-job", tmp_path)
        steps = []
        for node in ["make", "train"]:
            before = len(proxy.requests)
            [result] = run_all(project, env, "tags-job", run_id, [node])
            assert result.returncode == 0, result.stderr[-2000:]
            steps.append(proxy.requests[before:])
    finally:
        proxy.stop()
    tags = mlflow_server.client().get_run(run_id).data.tags
    assert tags["kedro_command"] == "kedro run --pipeline=__default__"
    # The pipeline's run id, not a step's Kedro session (run_id; session_id on Kedro 1.0).
    assert tags.get("run_id", tags.get("session_id")) == "tags-job-uuid"
    assert tags["env"] == "base"
    assert tags.get("pipeline_names", tags.get("pipeline_name")) in ("['__default__']", "__default__")
    assert not {"node_names", "runner"} & set(tags)
    tag_writes = [[body for method, path, body in step if "kedro_command" in body] for step in steps]
    assert [len(writes) for writes in tag_writes] == [1, 0]  # one request by the first step, none after
    assert not any(path.endswith("/runs/set-tag") for step in steps for _, path, _ in step)


@pytest.mark.kedro
def test_an_attached_step_builds_only_its_own_datasets_and_kedro_mlflows(tmp_path, mlflow_server) -> None:
    # kedro-mlflow's catalog pass built every entry of the catalog in every step; this one
    # cannot be built (no filepath), which only a step that builds it would notice.
    project = ml_project(tmp_path)
    with (project / "conf" / "base" / "catalog.yml").open("a") as catalog:
        catalog.write("other_pipelines_table:\n  type: pandas.CSVDataset\n")
    env = step_env(KEDRO_CONFIG_MLFLOW_TRACKING_URI=mlflow_server.url)
    run_id = start(project, env, "own-datasets-job", tmp_path)
    results = run_all(project, env, "own-datasets-job", run_id, ["make", "train"])
    assert all(r.returncode == 0 for r in results), results[-1].stderr[-2000:]
    assert mlflow_server.client().get_run(run_id).data.metrics["score"] == 3.0  # named by kedro-mlflow


def test_failing_pipeline_run_local_ends_failed_with_failed_node(tmp_path, mlflow_server) -> None:
    project = ml_project(tmp_path, limit=2)
    env = step_env(KEDRO_CONFIG_MLFLOW_TRACKING_URI=mlflow_server.url)
    compiled = kvx(project, "compile", "-o", str(tmp_path / "p.json"), env=env)
    assert compiled.returncode == 0, compiled.stderr[-2000:]
    result = kvx(project, "run-local", str(tmp_path / "p.json"), "--job-name", "failing-job", env=env, timeout=600)
    assert result.returncode == 1, result.stdout[-3000:]
    status = json.loads((project / ".kvx" / "runs" / "failing-job" / "status.json").read_text())
    assert status["states"]["report"] == "failed" and status["states"]["mlflow-end-run"] == "done"
    client = mlflow_server.client()
    experiment = client.get_experiment_by_name("mlproj")
    (run,) = client.search_runs([experiment.experiment_id], filter_string="tags.vertexai_job_name = 'failing-job'")
    assert run.info.status == "FAILED"
    assert run.data.tags["kvx.failed_node"] == "report"
    assert "model too large: 4 > 2" in run.data.tags["kvx.error"]
    assert run.data.tags["kvx.final_state"] == "FAILED"


def run_local_ml_project(tmp_path: Path, mlflow_server, job: str) -> tuple[Path, dict[str, str], Any]:
    """The ML project compiled and run by run-local against ``mlflow_server``: the project, its
    step environment and the pipeline's MLflow run."""
    project = ml_project(tmp_path)
    env = step_env(KEDRO_CONFIG_MLFLOW_TRACKING_URI=mlflow_server.url)
    assert kvx(project, "compile", "-o", str(tmp_path / "p.json"), env=env).returncode == 0
    result = kvx(project, "run-local", str(tmp_path / "p.json"), "--job-name", job, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:]
    client = mlflow_server.client()
    experiment = client.get_experiment_by_name("mlproj")
    (run,) = client.search_runs([experiment.experiment_id], filter_string=f"tags.vertexai_job_name = '{job}'")
    return project, env, run


def test_successful_run_local_with_mlflow_is_one_finished_run(tmp_path, mlflow_server) -> None:
    _, _, run = run_local_ml_project(tmp_path, mlflow_server, "ok-job")
    client = mlflow_server.client()
    assert run.info.status == "FINISHED"
    assert run.data.metrics["score"] == 3.0 and run.data.metrics["late_metrics.late_score"] == 4.0
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["report.txt"]
    assert run.data.tags["kvx.last_node"] in {"report", "wait_then_score"}


def test_basic_auth_with_environment_credentials(tmp_path, mlflow_auth_server) -> None:
    project = ml_project(tmp_path, {"env_vars": ["MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"]})
    env = step_env(KEDRO_CONFIG_MLFLOW_TRACKING_URI=mlflow_auth_server.url,
                   MLFLOW_TRACKING_USERNAME=ADMIN_USER, MLFLOW_TRACKING_PASSWORD=ADMIN_PASSWORD)
    run_id = start(project, env, "auth-job", tmp_path)
    (step,) = run_all(project, env, "auth-job", run_id, ["make"])
    assert step.returncode == 0, step.stderr[-2000:]
    assert end(project, env, "auth-job", "SUCCEEDED").returncode == 0
    for output in (step.stderr, step.stdout):
        assert ADMIN_PASSWORD not in output

    no_credentials = step_env(KEDRO_CONFIG_MLFLOW_TRACKING_URI=mlflow_auth_server.url,
                              MLFLOW_HTTP_REQUEST_MAX_RETRIES="0")
    project_without = ml_project(tmp_path / "second")
    result = kvx(project_without, "mlflow-start", "--run-id", "x", "--job-name", "denied",
                 "--output", str(tmp_path / "denied.txt"), env=no_credentials)
    assert result.returncode == 3
    message = last_json(result.stderr)["message"]
    assert "mlflow-start failed" in message and "unauthenticated (401)" in message
    assert "Traceback" not in result.stderr


def _assert_no_token_leaked(tokens: set[str] | list[str], *outputs: str) -> None:
    for token in tokens:
        for output in outputs:
            assert token not in output


def test_oauth_id_tokens_from_the_metadata_server_are_refreshed(tmp_path, fake_google, bearer_proxy) -> None:
    fake_google.lifetime = 4.0  # each token is reused for 2 s, so a 5 s node needs a new one
    try:
        project = ml_project(tmp_path, {"client_id": AUDIENCE}, wait_seconds=5)
        host = fake_google.url.removeprefix("http://")
        env = step_env(KEDRO_CONFIG_MLFLOW_TRACKING_URI=bearer_proxy.url, GCE_METADATA_HOST=host,
                       GCE_METADATA_IP=host, GOOGLE_APPLICATION_CREDENTIALS="", NO_GCE_CHECK="False")
        env.pop("GOOGLE_APPLICATION_CREDENTIALS")
        rejected_before = len(bearer_proxy.rejected)
        run_id = start(project, env, "oauth-job", tmp_path)
        seen_before = set(bearer_proxy.tokens_seen)
        steps = run_all(project, env, "oauth-job", run_id, ["make", "train", "wait_then_score"])
        assert all(s.returncode == 0 for s in steps), steps[-1].stderr[-3000:]
        assert end(project, env, "oauth-job", "SUCCEEDED").returncode == 0
    finally:
        fake_google.lifetime = 3600.0
    assert len(bearer_proxy.rejected) == rejected_before  # every request carried a valid token
    # The slow step needed more than one token: it refreshed before expiry.
    assert len(bearer_proxy.tokens_seen - seen_before) >= 4
    _assert_no_token_leaked(fake_google.issued, *(s.stderr for s in steps), *(s.stdout for s in steps))


def _handed_token(issued_ago: float, lasts: float) -> str:
    """A Google ID token for AUDIENCE as Airflow's worker hands it to a task (GoogleOAuth2)."""
    from integration.fakes import make_jwt

    now = time.time()
    return make_jwt({"aud": AUDIENCE, "email": "worker@kvx-test.iam.gserviceaccount.com",
                     "iat": int(now - issued_ago), "exp": now + lasts, "iss": "https://accounts.google.com"})


def test_a_token_handed_by_airflows_worker_is_renewed_by_a_step_that_outlives_it(
        tmp_path, fake_google, bearer_proxy, mlflow_server) -> None:
    """Airflow's GoogleOAuth2 hands each task an ID token (MLFLOW_TRACKING_TOKEN) and its audience
    (KVX_MLFLOW_TOKEN_AUDIENCE): a step uses it, then mints the next from its own credentials
    (here the metadata server) once the token nears its end, instead of being refused (401)."""
    project = ml_project(tmp_path, wait_seconds=12)
    host = fake_google.url.removeprefix("http://")
    env = step_env(KEDRO_CONFIG_MLFLOW_TRACKING_URI=bearer_proxy.url, GCE_METADATA_HOST=host,
                   GCE_METADATA_IP=host, NO_GCE_CHECK="False", KVX_MLFLOW_TOKEN_AUDIENCE=AUDIENCE,
                   CLOUDSDK_CONFIG=str(tmp_path / "no-gcloud"))
    env.pop("GOOGLE_APPLICATION_CREDENTIALS", None)
    rejected_before, seen_before = len(bearer_proxy.rejected), set(bearer_proxy.tokens_seen)
    handed = [_handed_token(0, 3600)]
    run_id = start(project, {**env, "MLFLOW_TRACKING_TOKEN": handed[0]}, "handed-job", tmp_path)
    steps = []
    for node in ["make", "train", "wait_then_score"]:  # the step's own client, then MLflow's (kedro-mlflow datasets)
        # 20 s tokens are used for their first 10 s: the 12 s node's metrics need a new one.
        handed.append(_handed_token(0, 20))
        steps += run_all(project, {**env, "MLFLOW_TRACKING_TOKEN": handed[-1]}, "handed-job", run_id, [node])
        assert steps[-1].returncode == 0, steps[-1].stderr[-3000:]
    handed.append(_handed_token(0, 3600))
    assert end(project, {**env, "MLFLOW_TRACKING_TOKEN": handed[-1]}, "handed-job", "SUCCEEDED").returncode == 0
    assert len(bearer_proxy.rejected) == rejected_before  # every request carried a valid token
    seen = bearer_proxy.tokens_seen - seen_before
    assert set(handed) <= seen  # each step used the token it was handed...
    assert seen - set(handed) and seen - set(handed) <= set(fake_google.issued)  # ...then its own
    run = mlflow_server.client().get_run(run_id)
    assert run.data.metrics["late_metrics.late_score"] == 4.0
    _assert_no_token_leaked([*handed, *fake_google.issued], *(s.stderr for s in steps), *(s.stdout for s in steps))


def test_a_step_that_cannot_renew_a_handed_token_says_why(tmp_path, fake_google, bearer_proxy) -> None:
    """Without Google credentials, a step works for as long as its handed token does; then its
    next MLflow request fails the step (exit 3) with the reason and the fix, whether the token
    ran out during the node or before the step began, through MLflow's client or the step's own."""
    project = ml_project(tmp_path, wait_seconds=15)
    env = step_env(KEDRO_CONFIG_MLFLOW_TRACKING_URI=bearer_proxy.url, GCE_METADATA_HOST="127.0.0.1:9",
                   GCE_METADATA_IP="127.0.0.1:9", NO_GCE_CHECK="True", KVX_MLFLOW_TOKEN_AUDIENCE=AUDIENCE,
                   CLOUDSDK_CONFIG=str(tmp_path / "no-gcloud"))
    env.pop("GOOGLE_APPLICATION_CREDENTIALS", None)
    run_id = start(project, {**env, "MLFLOW_TRACKING_TOKEN": _handed_token(0, 3600)}, "stale-job", tmp_path)
    fresh = run_all(project, {**env, "MLFLOW_TRACKING_TOKEN": _handed_token(0, 3600)}, "stale-job", run_id,
                    ["make", "train"])
    assert [step.returncode for step in fresh] == [0, 0], fresh[-1].stderr[-3000:]
    # The token's hour ends 15 s into the step, during the node (15 s): its metrics cannot be logged.
    expiring = _handed_token(3600, 15)
    (during,) = run_all(project, {**env, "MLFLOW_TRACKING_TOKEN": expiring}, "stale-job", run_id,
                        ["wait_then_score"])
    stale = _handed_token(3600, 3)  # the step started as the token's hour ran out
    (before,) = run_all(project, {**env, "MLFLOW_TRACKING_TOKEN": stale}, "stale-job", run_id, ["make"])
    for step, token in ((during, expiring), (before, stale)):
        assert step.returncode == 3, step.stderr[-3000:]
        message = last_json(step.stderr)["message"]
        assert "handed to this step" in message and "has expired" in message and AUDIENCE in message, message
        assert "Traceback" not in step.stderr and token not in step.stderr
    assert "expires soon" in during.stderr  # said at the step's first request, before it failed


def _service_account_key(path: Path, token_uri: str, email: str) -> Path:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
    path.write_text(json.dumps({
        "type": "service_account", "project_id": "kvx-test", "private_key_id": "k1",
        "private_key": pem, "client_email": email, "client_id": "1",
        "token_uri": token_uri,
    }))
    return path


def test_iam_id_tokens_with_a_service_account_key(tmp_path, fake_google, bearer_proxy) -> None:
    key = _service_account_key(tmp_path / "key.json", f"{fake_google.url}/token",
                               "caller@kvx-test.iam.gserviceaccount.com")
    target = "pipelines@kvx-test.iam.gserviceaccount.com"
    project = ml_project(tmp_path, {"service_account": target, "client_id": AUDIENCE,
                                    "iam_endpoint": fake_google.url})
    env = step_env(KEDRO_CONFIG_MLFLOW_TRACKING_URI=bearer_proxy.url, GOOGLE_APPLICATION_CREDENTIALS=str(key),
                   GCE_METADATA_HOST="127.0.0.1:9", NO_GCE_CHECK="True")
    calls_before = len(fake_google.iam_calls)
    run_id = start(project, env, "iam-job", tmp_path)
    (step,) = run_all(project, env, "iam-job", run_id, ["make"])
    assert step.returncode == 0, step.stderr[-3000:]
    new_calls = fake_google.iam_calls[calls_before:]
    assert new_calls and all(c["account"] == target and c["audience"] == AUDIENCE for c in new_calls)
    _assert_no_token_leaked(fake_google.issued, step.stderr, step.stdout)


def test_a_rejected_token_is_refreshed_after_401(tmp_path, fake_google, bearer_proxy, monkeypatch) -> None:
    """In-process: the token cache is dropped and the request retried once after a 401."""
    from mlflow.tracking import MlflowClient

    from kvx_runtime.auth import install_request_header_provider, uninstall_request_header_provider
    from kvx_runtime.config import MLflowConfig

    key = _service_account_key(tmp_path / "key.json", f"{fake_google.url}/token",
                               "caller@kvx-test.iam.gserviceaccount.com")
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(key))
    install_request_header_provider(MLflowConfig(request_header_provider_params={"client_id": AUDIENCE}))
    try:
        client = MlflowClient(tracking_uri=bearer_proxy.url)
        client.search_experiments(max_results=1)
        first = set(bearer_proxy.tokens_seen)
        bearer_proxy.revoked |= first
        rejected = len(bearer_proxy.rejected)
        client.search_experiments(max_results=1)  # 401, refresh, retry
        assert len(bearer_proxy.rejected) == rejected + 1
        assert bearer_proxy.tokens_seen - first  # a new token was used
    finally:
        uninstall_request_header_provider()


def test_oauth_credentials_provider_writes_the_token_into_credentials(tmp_path, fake_google) -> None:
    project = ml_project(tmp_path)
    key = _service_account_key(tmp_path / "key.json", f"{fake_google.url}/token", "sa@kvx-test.iam.gserviceaccount.com")
    vertexai = project / "conf" / "base" / "vertexai.yml"
    config = yaml.safe_load(vertexai.read_text())
    config["run_config"]["dynamic_config_providers"] = [
        {"cls": "kedro_vertexai.auth.gcp.MLFlowGoogleOAuthCredentialsProvider", "params": {"client_id": AUDIENCE}}]
    vertexai.write_text(yaml.safe_dump(config))
    (project / "conf" / "base" / "mlflow.yml").unlink()  # MLflow off: only the provider is tested
    env = step_env(GOOGLE_APPLICATION_CREDENTIALS=str(key))
    result = run_step(project, "--node", "make", "--storage-root", str(tmp_path / "s"), env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    # Steps run in the base env by default: what a container without conf/local does.
    credentials = yaml.safe_load((project / "conf" / "base" / "credentials.yml").read_text())
    token = credentials["gcp_credentials"]["MLFLOW_TRACKING_TOKEN"]
    assert token in fake_google.issued
    assert token not in result.stderr


@pytest.mark.kedro
def test_unreachable_mlflow_exits_3_unless_not_required(tmp_path) -> None:
    from conftest import free_port

    url = f"http://127.0.0.1:{free_port()}"
    env = step_env(KEDRO_CONFIG_MLFLOW_TRACKING_URI=url, MLFLOW_HTTP_REQUEST_MAX_RETRIES="0")
    project = ml_project(tmp_path)
    result = run_step(project, "--node", "make", "--job-name", "down", env=env)
    assert result.returncode == 3
    assert f"MLflow at {url}: the tracking server is unreachable" in result.last_message

    optional = ml_project(tmp_path / "optional", required=False)
    result = run_step(optional, "--node", "make", "--job-name", "down", env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert any("runs untracked" in m for m in result.messages())
    # Steps whose outputs are kedro-mlflow datasets run too: local files saved, nothing logged.
    for node in ("train", "report"):
        result = run_step(optional, "--node", node, "--job-name", "down", env=env)
        assert result.returncode == 0, f"{node}: {result.stderr[-2000:]}"
        muted = [m for m in result.messages() if "kedro-mlflow datasets log nothing" in m]
        assert len(muted) == 1
    assert (optional / "data" / "report.txt").exists()


@pytest.mark.kedro
def test_without_kedro_mlflow_nodes_run_untracked(tmp_path) -> None:
    shim = tmp_path / "shim"
    shim.mkdir()
    # Simulates an image without the mlflow extra: kedro_mlflow and mlflow cannot be imported.
    (shim / "sitecustomize.py").write_text(
        "import sys\nsys.modules['kedro_mlflow'] = None\nsys.modules['mlflow'] = None\n")
    project = ml_project(tmp_path)
    (project / "conf" / "base" / "catalog.yml").write_text("")
    env = step_env(PYTHONPATH=f"{shim}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    result = run_step(project, "--node", "make", "--storage-root", str(tmp_path / "s"), env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    infos = [m for m in result.messages() if "kedro-mlflow is not installed" in m]
    assert len(infos) == 1


def test_mlflow_lost_during_a_step_exits_3(tmp_path, mlflow_server) -> None:
    from integration.faults import Forwarder

    relay = Forwarder(mlflow_server.port).start()
    try:
        project = ml_project(tmp_path, wait_seconds=3.0)
        env = step_env(KEDRO_CONFIG_MLFLOW_TRACKING_URI=relay.url, MLFLOW_HTTP_REQUEST_MAX_RETRIES="0")
        run_id = start(project, env, "lost-job", tmp_path)
        assert all(r.returncode == 0 for r in run_all(project, env, "lost-job", run_id, ["make", "train"]))
        process = subprocess.Popen(
            [*KVX, "exec-node", "--node", "wait_then_score", "--run-id", "lost-job-uuid", "--job-name", "lost-job",
             "--mlflow-run-id", run_id], cwd=project, env=env, stderr=subprocess.PIPE, text=True)
        assert process.stderr is not None
        for line in process.stderr:
            if '"node started"' in line:
                break
        relay.cut()  # the tracking server goes away while the node runs
        _, rest = process.communicate(timeout=120)
    finally:
        relay.stop()
    assert process.returncode == 3, rest[-2000:]
    final = last_json(rest)
    assert final["message"].startswith("exec-node failed: MLflow became unreachable during the step")
    assert "Traceback" not in final["message"]


def test_a_parameter_changed_within_one_run_is_a_clear_config_error(tmp_path, mlflow_server) -> None:
    project = ml_project(tmp_path)
    env = step_env(KEDRO_CONFIG_MLFLOW_TRACKING_URI=mlflow_server.url)
    run_id = start(project, env, "param-job", tmp_path)
    assert all(r.returncode == 0 for r in run_all(project, env, "param-job", run_id, ["make", "train"]))
    changed = run_step(project, "--node", "train", "--run-id", "param-job-uuid", "--job-name", "param-job",
                       "--mlflow-run-id", run_id, "--param", "lr=0.9", env=env)
    assert changed.returncode == 2, changed.stderr[-2000:]
    assert ("parameter lr already logged with another value in this pipeline's MLflow run"
            in changed.last_message)
    assert "Changing param values is not allowed" not in changed.last_message


def test_a_lost_answer_to_the_create_request_leaves_one_run(tmp_path, mlflow_server) -> None:
    from integration.faults import FaultPlan, FaultProxy

    plan = FaultPlan(rules=[(lambda method, path: method == "POST" and "/runs/create" in path, "lost")])
    proxy = FaultProxy(mlflow_server.port, plan).start()
    try:
        project = ml_project(tmp_path)
        env = step_env(KEDRO_CONFIG_MLFLOW_TRACKING_URI=proxy.url)
        run_id = start(project, env, "lost-create-job", tmp_path)
    finally:
        proxy.stop()
    assert proxy.injected["lost"] == 1  # the server created a run and its answer never came
    client = mlflow_server.client()
    experiment = client.get_experiment_by_name("mlproj")
    runs = client.search_runs([experiment.experiment_id], filter_string="tags.vertexai_job_name = 'lost-create-job'")
    assert [run.info.run_id for run in runs] == [run_id]


@pytest.mark.parametrize("store", ["server", "embedded"])
def test_parallel_steps_writing_the_same_new_tag_all_succeed(store, mlflow_server, tmp_path) -> None:
    """MLflow's single tag write is a look-up then an insert: two steps setting the same new tag
    at once (kedro-mlflow's ``kedro_command`` in every step) make one insert fail with a
    unique-key violation. Without the retry, this race fails several of the 180 writes
    (measured: 14 on the server, more on an embedded sqlite store)."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from mlflow.tracking import MlflowClient

    from kvx_runtime.mlflow.concurrent_tags import install_concurrent_tag_retry, is_unique_key_race

    install_concurrent_tag_retry()
    uri = mlflow_server.url if store == "server" else f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    run_id = client.create_run(client.create_experiment(f"tag-race-{store}")).info.run_id
    writers, keys = 6, 30
    for key in range(keys):
        barrier = threading.Barrier(writers)

        def write(writer: int, key: int = key, barrier: threading.Barrier = barrier) -> None:
            barrier.wait()
            client.set_tag(run_id, f"step.tag{key}", f"writer{writer}")

        with ThreadPoolExecutor(writers) as pool:
            for future in [pool.submit(write, writer) for writer in range(writers)]:
                future.result()  # raises the writer's error, if any
    tags = client.get_run(run_id).data.tags
    assert {f"step.tag{key}" for key in range(keys)} <= set(tags)
    assert all(tags[f"step.tag{key}"].startswith("writer") for key in range(keys))
    # Only the race is retried: a different error (a run that does not exist) passes through.
    with pytest.raises(Exception) as missing:
        client.set_tag("0" * 32, "step.tag", "x")
    assert not is_unique_key_race(missing.value)


def test_node_seconds_recorded_in_mlflow_guide_the_auto_grouper(tmp_path, mlflow_server) -> None:
    """Each step writes its nodes' seconds into the pipeline's run; a later compile with the
    `auto` grouper reads them (run-local's own logs removed: only MLflow knows them), and an
    MLflow that does not answer leaves the compile going, without durations."""
    import shutil

    from conftest import free_port

    project, env, run = run_local_ml_project(tmp_path, mlflow_server, "timed-job")
    seconds = {key: value for key, value in run.data.metrics.items() if key.startswith("kvx.node_seconds.")}
    assert sorted(seconds) == [f"kvx.node_seconds.{node}" for node in ("make", "report", "train", "wait_then_score")]
    assert all(value >= 0 for value in seconds.values())

    shutil.rmtree(project / ".kvx" / "runs")
    vertexai = project / "conf" / "base" / "vertexai.yml"
    config = yaml.safe_load(vertexai.read_text())
    config["run_config"]["grouping"] = {"cls": "auto"}
    vertexai.write_text(yaml.safe_dump(config))
    fused = kvx(project, "compile", "-o", str(tmp_path / "auto.json"), env=env)
    assert fused.returncode == 0, fused.stderr[-3000:]
    assert "4 nodes grouped into 1 steps by auto" in fused.stderr
    assert "node durations of earlier runs" in fused.stderr

    offline = step_env(KEDRO_CONFIG_MLFLOW_TRACKING_URI=f"http://127.0.0.1:{free_port()}")
    chained = kvx(project, "compile", "-o", str(tmp_path / "offline.json"), env=offline, timeout=120)
    assert chained.returncode == 0, chained.stderr[-3000:]
    assert "node durations of earlier runs were not read from MLflow" in chained.stderr
    assert "4 nodes grouped into 3 steps by auto" in chained.stderr  # the chain rule: make and train
    assert "node durations unknown" in chained.stderr


NESTED_NODES = """
import mlflow

def sweep(n):
    with mlflow.start_run(nested=True, run_name="trial") as trial:
        mlflow.log_param("trial_n", n)
    return trial.info.run_id

def leave_open(n):
    mlflow.start_run(nested=True, run_name="left-open")
    return n

def after(n):
    mlflow.log_metric("after_metric", float(n))
    return n
"""
NESTED_PIPELINE = """
from kedro.pipeline import Node, Pipeline
from nestproj.nodes import after, leave_open, sweep

def register_pipelines():
    return {"__default__": Pipeline([
        Node(sweep, "params:n", "trial_id", name="sweep"),
        Node(leave_open, "params:n", "opened", name="leave_open"),
        Node(after, "opened", "done", name="after"),
    ])}
"""


@pytest.mark.kedro
def test_a_run_a_node_starts_is_a_child_of_the_pipelines_run_in_its_experiment(tmp_path, mlflow_server) -> None:
    # A step attaching to the run it is given does not look its experiment up by name: the run
    # names it, and runs its nodes start go there, as kedro-mlflow's set_experiment would have them.
    project = make_project(tmp_path, "nestproj", NESTED_NODES, NESTED_PIPELINE,
                           catalog="trial_id:\n  type: json.JSONDataset\n  filepath: data/trial.json\n",
                           vertexai=yaml.safe_dump({"run_config": {"image": "img", "root": str(tmp_path / "s")}}))
    (project / "conf" / "base" / "parameters.yml").write_text("n: 7\n")
    (project / "conf" / "base" / "mlflow.yml").write_text(
        "server:\n  mlflow_tracking_uri: ${mlflow_tracking_uri}\ntracking:\n  experiment:\n    name: nestproj\n")
    env = step_env(KEDRO_CONFIG_MLFLOW_TRACKING_URI=mlflow_server.url)
    run_id = start(project, env, "nested-job", tmp_path)
    # An experiment named by the environment does not win over the pipeline's, as with set_experiment.
    result = run_all(project, {**env, "MLFLOW_EXPERIMENT_NAME": "elsewhere"}, "nested-job", run_id, ["sweep"])[0]
    assert result.returncode == 0, result.stderr[-3000:]
    client = mlflow_server.client()
    parent = client.get_run(run_id)
    trial = client.get_run(json.loads((project / "data" / "trial.json").read_text()))
    assert trial.info.experiment_id == parent.info.experiment_id \
        == client.get_experiment_by_name("nestproj").experiment_id
    assert trial.data.tags["mlflow.parentRunId"] == run_id and trial.data.params["trial_n"] == "7"
    assert parent.info.status == "RUNNING" and client.get_experiment_by_name("elsewhere") is None
    # A node that leaves a run of its own open does not take the next node's logging from the
    # pipeline's run (kedro-mlflow reopens the pipeline's run before that node, as it would).
    group = run_step(project, "--node", "leave_open", "--node", "after", "--run-id", "nested-job-uuid",
                     "--job-name", "nested-job", "--mlflow-run-id", run_id, env=env)
    assert group.returncode == 0, group.stderr[-3000:]
    assert client.get_run(run_id).data.metrics["after_metric"] == 7.0


def test_a_step_refused_after_attaching_leaves_the_pipelines_run_running(tmp_path, mlflow_server) -> None:
    # Refused after the run became this process's active run (a catalog that cannot be read for
    # the run's load versions): MLflow's exit handler must not end the shared run FINISHED.
    project = ml_project(tmp_path)
    env = step_env(KEDRO_CONFIG_MLFLOW_TRACKING_URI=mlflow_server.url)
    run_id = start(project, env, "refused-job", tmp_path)
    assert run_all(project, env, "refused-job", run_id, ["make"])[0].returncode == 0
    catalog = project / "conf" / "base" / "catalog.yml"
    catalog.write_text(catalog.read_text() + "\nbroken:\n  type: pickle.PickleDataset\n"
                                             "  filepath: ${not_defined_anywhere}/x.pkl\n")
    refused = run_step(project, "--node", "train", "--run-id", "refused-job-uuid", "--job-name", "refused-job",
                       "--mlflow-run-id", run_id, "--save-version", "2026-11-24T10.15.00.000Z", env=env)
    assert refused.returncode == 2, refused.stderr[-2000:]
    run = mlflow_server.client().get_run(run_id)
    assert run.info.status == "RUNNING" and run.info.end_time is None
