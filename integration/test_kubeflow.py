"""``kvx-runtime kfp ...`` against a fake Kubeflow Pipelines API on 127.0.0.1.

The fake (integration/fake_kfp.py) checks every request body against the published
kfp-server-api models and requires the auth of its mode: a bearer token, a Google IAP ID
token (from the fake Google token endpoint) or a Dex login.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from integration.conftest import KVX, step_env
from integration.fake_kfp import BEARER_TOKEN, DEX_PASSWORD, DEX_USER, FakeKfp

pytestmark = pytest.mark.slow

IAP_CLIENT = "kvx-kfp-iap-client.apps.googleusercontent.com"


@pytest.fixture
def kfp(request) -> Iterator[FakeKfp]:
    mode = getattr(request, "param", "bearer")
    server = FakeKfp(auth=mode, audience=IAP_CLIENT).start()
    yield server
    server.stop()


def configure(project: Path, kfp: FakeKfp, host: str | None = None) -> None:
    config = project / "conf" / "base" / "vertexai.yml"
    config.write_text(config.read_text() + f"\nhost: {host or kfp.url}\n")
    config.write_text(config.read_text().replace("run_config:\n", "run_config:\n  namespace: team-a\n", 1))


def kfp_cli(project: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    environment = step_env(KVX_WATCH_INTERVAL="0.05", KVX_API_RETRY_WAIT="0.05", KVX_LOG_FORMAT="json",
                           **env)
    return subprocess.run([*KVX, "kfp", *args], cwd=project, env=environment, capture_output=True, text=True,
                          timeout=300)


def test_upload_run_schedule_list_terminate_with_a_bearer_token(example_project: Path, kfp: FakeKfp) -> None:
    configure(example_project, kfp)
    token = {"KF_PIPELINES_TOKEN": BEARER_TOKEN}

    first = kfp_cli(example_project, "upload-pipeline", **token)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "as a new pipeline" in first.stdout
    second = kfp_cli(example_project, "upload-pipeline", "--tag", "release", **token)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "as a new version" in second.stdout
    [pipeline_id] = kfp.pipelines
    assert len(kfp.versions[pipeline_id]) == 2

    ran = kfp_cli(example_project, "run-once", "--wait", "--param", "reporting.top_n=2", **token)
    assert ran.returncode == 0, ran.stdout[-2000:] + ran.stderr[-3000:]
    [run] = kfp.runs.values()
    assert run["state"] == "SUCCEEDED" and "SUCCEEDED" in ran.stdout
    [experiment] = kfp.experiments.values()
    assert experiment["display_name"] == "spaceflights-kvx" and experiment["namespace"] == "team-a"
    assert run["experiment_id"] == experiment["experiment_id"]
    parameters = run["runtime_config"]["parameters"]
    assert parameters["kvx_save_version"].endswith("Z")  # KFP may not fill the create-time placeholder
    assert f"/_/pipeline/#/runs/details/{run['run_id']}" in ran.stdout

    listed = kfp_cli(example_project, "list-pipelines", **token)
    assert listed.returncode == 0 and run["run_id"] in listed.stdout and "SUCCEEDED" in listed.stdout
    status = kfp_cli(example_project, "status", run["run_id"], **token)
    assert status.returncode == 0, status.stderr[-2000:]
    assert f"{run['run_id']}: SUCCEEDED" in status.stdout, status.stdout
    assert "SUCCEEDED  data-science-train-model-node" in status.stdout, status.stdout
    console = kfp_cli(example_project, "ui", **token)
    ui_url = f"{kfp.url.removesuffix('/pipeline')}/_/pipeline/#/runs"
    assert console.returncode == 0 and console.stdout.strip() == ui_url
    # The plugin family's command names, through Kedro's own CLI.
    kedro_listed = subprocess.run([sys.executable, "-m", "kedro", "kubeflow", "list-pipelines"], cwd=example_project,
                                  env=step_env(KVX_LOG_FORMAT="json", **token),
                                  capture_output=True, text=True, timeout=300)
    assert kedro_listed.returncode == 0, kedro_listed.stderr[-2000:]
    assert run["run_id"] in kedro_listed.stdout

    for _ in range(2):  # twice: one recurring run, replaced rather than duplicated
        scheduled = kfp_cli(example_project, "schedule", "--cron", "0 6 * * *", **token)
        assert scheduled.returncode == 0, scheduled.stderr[-3000:]
    [recurring] = kfp.recurring.values()
    assert recurring["trigger"]["cron_schedule"]["cron"] == "0 0 6 * * *"
    assert recurring["no_catchup"] is True and recurring["max_concurrency"] == "1"
    assert "kvx_save_version" not in recurring["runtime_config"]["parameters"]
    paused = kfp_cli(example_project, "schedule", "--pause", **token)
    assert paused.returncode == 0 and "DISABLED" in paused.stdout
    # Scheduling again (a CI deploy) replaces the recurring run and keeps it paused.
    again = kfp_cli(example_project, "schedule", "--cron", "0 7 * * *", **token)
    assert again.returncode == 0, again.stderr[-2000:]
    [replaced] = kfp.recurring.values()
    assert replaced["status"] == "DISABLED" and replaced is not recurring

    kfp.fail_tasks = set()
    started = kfp_cli(example_project, "run-once", **token)
    assert started.returncode == 0
    [newest] = [other for other in kfp.runs.values() if other is not run]
    cancelled = kfp_cli(example_project, "cancel", newest["run_id"], **token)
    assert cancelled.returncode == 0, cancelled.stderr[-2000:]
    assert newest["state"] == "CANCELED" and ("POST", f"/pipeline/apis/v2beta1/runs/{newest['run_id']}:terminate") \
        in kfp.requests
    assert kfp.problems == []
    everything = "".join(r.stdout + r.stderr for r in (first, second, ran, listed, scheduled, started, cancelled))
    assert BEARER_TOKEN not in everything


@pytest.mark.parametrize("masked", [False, True], ids=["kfp", "kfp-before-2.4"])
def test_a_failing_run_exits_1_and_says_which_task_failed(example_project: Path, kfp: FakeKfp, masked: bool) -> None:
    # KFP before 2.4 says SUCCEEDED for a run whose exit handler succeeded after a task failed.
    configure(example_project, kfp)
    parameters = example_project / "conf" / "base" / "parameters.yml"
    parameters.write_text(parameters.read_text() + "\napi_key: none\ndb: {host: h, password: none}\n")
    kfp.fail_tasks = {"data-science-train-model-node"}
    kfp.exit_handler_masks_failures = masked
    ran = kfp_cli(example_project, "run-once", "--wait", "--param", "api_key=sk-live-kvx-7Q2", "--param",
                  'db={"host": "h", "password": "pw-kvx-9Z"}', KF_PIPELINES_TOKEN=BEARER_TOKEN)
    assert ran.returncode == 1
    assert "task data-science-train-model-node FAILED: exit status 1: node raised ValueError" in ran.stdout
    assert "ran as:  data-science-train-model-node-pod" in ran.stdout
    assert "replay:  kvx-runtime exec-node --node data_science.train_model_node" in ran.stdout
    # The replay is printed, not logged: secret-named parameters are masked in it all the same.
    assert "--param 'api_key:str=[redacted]'" in ran.stdout and '"password": "[redacted]"' in ran.stdout
    assert "sk-live-kvx-7Q2" not in ran.stdout + ran.stderr and "pw-kvx-9Z" not in ran.stdout + ran.stderr
    # The replay names the job directory the step used: the display name made unique by the uuid.
    [run] = kfp.runs.values()
    assert f"--job-name {run['display_name']}-{run['run_id']} " in ran.stdout
    assert kfp.problems == []


def test_without_credentials_the_api_error_is_one_clear_line(example_project: Path, kfp: FakeKfp) -> None:
    configure(example_project, kfp)
    ran = kfp_cli(example_project, "run-once", KF_PIPELINES_TOKEN="wrong-token-value")
    assert ran.returncode == 2
    errors = [json.loads(line) for line in ran.stderr.splitlines() if line.startswith("{")]
    assert any("Kubeflow Pipelines refused" in e["message"] and "Unauthenticated" in e["message"] for e in errors)
    assert "Traceback" not in ran.stderr and "wrong-token-value" not in ran.stderr + ran.stdout


@pytest.mark.parametrize("kfp", ["iap"], indirect=True)
def test_iap_id_tokens_for_the_client_id(example_project: Path, kfp: FakeKfp, fake_google) -> None:
    configure(example_project, kfp)
    host = fake_google.url.removeprefix("http://")
    ran = kfp_cli(example_project, "run-once", "--wait", IAP_CLIENT_ID=IAP_CLIENT, GCE_METADATA_HOST=host,
                  GCE_METADATA_IP=host, GOOGLE_APPLICATION_CREDENTIALS="", NO_GCE_CHECK="False")
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert kfp.problems == [] and len(kfp.runs) == 1


@pytest.mark.parametrize("kfp", ["dex", "oauth2-proxy"], indirect=True)
def test_dex_static_password_login(example_project: Path, kfp: FakeKfp) -> None:
    """Through oidc-authservice (Kubeflow <= 1.8) and oauth2-proxy (>= 1.9), whose session
    cookie, too large for one cookie, comes split in parts that must all be sent back."""
    configure(example_project, kfp)
    ran = kfp_cli(example_project, "run-once", "--wait", DEX_USERNAME=DEX_USER, DEX_PASSWORD=DEX_PASSWORD)
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert kfp.logins == 1 and len(kfp.runs) == 1  # one login for the whole command
    wrong = kfp_cli(example_project, "list-pipelines", DEX_USERNAME=DEX_USER, DEX_PASSWORD="not-the-password")
    assert wrong.returncode == 2
    assert f"Dex refused the login of '{DEX_USER}'" in wrong.stderr
    assert "not-the-password" not in wrong.stderr + wrong.stdout
    assert DEX_PASSWORD not in ran.stderr + ran.stdout


@pytest.mark.parametrize("kfp", ["dex"], indirect=True)
def test_a_revoked_session_is_renewed_once_after_401(example_project: Path, kfp: FakeKfp) -> None:
    """The cluster ends the session after its first use: the next request gets 401, the client
    logs in again and the command succeeds."""
    configure(example_project, kfp)
    kfp.revoke_after_first_use = True
    ran = kfp_cli(example_project, "list-pipelines", DEX_USERNAME=DEX_USER, DEX_PASSWORD=DEX_PASSWORD)
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert kfp.logins == 2 and len(kfp.revoked) == 1, (kfp.requests, kfp.revoked)


def test_lost_answers_to_creations_never_create_anything_twice(example_project: Path, kfp: FakeKfp) -> None:
    """KFP takes no request id: after a lost answer the experiment (whose retry gets 409), the
    run and the recurring run are looked up before the create is sent again."""
    configure(example_project, kfp)
    kfp.lose_next_answer_to = {"experiments", "runs"}
    ran = kfp_cli(example_project, "run-once", KF_PIPELINES_TOKEN=BEARER_TOKEN)
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert len(kfp.runs) == 1 and len(kfp.experiments) == 1, (kfp.requests, ran.stderr[-3000:])
    [run] = kfp.runs.values()
    assert run["run_id"] in ran.stdout and "the run exists" in ran.stderr and "the experiment exists" in ran.stderr
    assert not kfp.lose_next_answer_to

    for _ in range(2):  # a new schedule, then its replacement, each answer lost
        kfp.lose_next_answer_to = {"recurringruns"}
        scheduled = kfp_cli(example_project, "schedule", "--cron", "0 3 * * *",
                            KF_PIPELINES_TOKEN=BEARER_TOKEN)
        assert scheduled.returncode == 0, scheduled.stderr[-3000:]
        assert "the recurring run exists" in scheduled.stderr
        assert len(kfp.recurring) == 1, kfp.recurring


MINIO_SECRET = """
  kubernetes:
    secrets_as_env:
      - secret_name: mlpipeline-minio-artifact
        keys: {accesskey: AWS_ACCESS_KEY_ID, secretkey: AWS_SECRET_ACCESS_KEY}
"""


def test_kubernetes_secrets_reach_every_step_as_environment_variables(example_project: Path, kfp: FakeKfp) -> None:
    """run_config.kubernetes.secrets_as_env becomes the platform spec of runs, recurring runs and
    uploads (checked by the fake against kfp-pipeline-spec's PlatformSpec); the secret's values
    never pass through us."""
    from integration.fake_kfp import split_pipeline_spec

    configure(example_project, kfp)
    config = example_project / "conf" / "base" / "vertexai.yml"
    config.write_text(config.read_text().replace("run_config:\n", "run_config:" + MINIO_SECRET, 1))
    token = {"KF_PIPELINES_TOKEN": BEARER_TOKEN}
    wanted = [{"secretName": "mlpipeline-minio-artifact",
               "secretNameParameter": {"runtimeValue": {"constant": "mlpipeline-minio-artifact"}},
               "keyToEnv": [{"secretKey": "accesskey", "envVar": "AWS_ACCESS_KEY_ID"},
                            {"secretKey": "secretkey", "envVar": "AWS_SECRET_ACCESS_KEY"}]}]

    def secrets_of_every_executor(pipeline_spec: dict) -> None:
        spec, platform = split_pipeline_spec(pipeline_spec)
        assert platform is not None, "no platform spec"
        executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
        assert set(executors) == set(spec["deploymentSpec"]["executors"])
        assert all(config == {"secretAsEnv": wanted} for config in executors.values())

    ran = kfp_cli(example_project, "run-once", "--wait", **token)
    assert ran.returncode == 0, ran.stderr[-3000:]
    [run] = kfp.runs.values()
    secrets_of_every_executor(run["pipeline_spec"])
    assert all(task["state"] == "SUCCEEDED" for task in run["run_details"]["task_details"])

    scheduled = kfp_cli(example_project, "schedule", "--cron", "0 3 * * *", **token)
    assert scheduled.returncode == 0, scheduled.stderr[-3000:]
    [recurring] = kfp.recurring.values()
    secrets_of_every_executor(recurring["pipeline_spec"])

    uploaded = kfp_cli(example_project, "upload-pipeline", **token)
    assert uploaded.returncode == 0, uploaded.stderr[-3000:]
    [versions] = kfp.versions.values()
    secrets_of_every_executor(versions[0]["pipeline_spec"])
    assert kfp.problems == []

    # A YAML compiled for KFP (to upload by hand) carries it as its second document; JSON cannot.
    import yaml

    compiled = kfp_cli(example_project, "compile", "-o", "kfp.yaml")
    assert compiled.returncode == 0, compiled.stderr[-3000:]
    spec, platform = yaml.safe_load_all((example_project / "kfp.yaml").read_text())
    secrets_of_every_executor({"pipeline_spec": spec, "platform_spec": platform})
    as_json = kfp_cli(example_project, "compile", "-o", "kfp.json")
    assert as_json.returncode == 0 and "run_config.kubernetes is left out of a JSON spec" in as_json.stderr
    assert "mlpipeline-minio-artifact" not in (example_project / "kfp.json").read_text()

    # A name Kubernetes refuses is a config error before any request.
    config.write_text(config.read_text().replace("secret_name: mlpipeline-minio-artifact",
                                                 "secret_name: MinIO_Secret"))
    requests_before = len(kfp.requests)
    refused = kfp_cli(example_project, "run-once", **token)
    assert refused.returncode == 2 and "is not a Kubernetes secret name" in refused.stderr
    assert len(kfp.requests) == requests_before


def test_an_upload_whose_answer_was_lost_is_not_sent_twice(example_project: Path, kfp: FakeKfp) -> None:
    """A retried upload gets 409 (the name is taken by the first try): it counts as done only when
    the version found holds exactly this spec; a name taken by another spec stays an error."""
    configure(example_project, kfp)
    token = {"KF_PIPELINES_TOKEN": BEARER_TOKEN}
    kfp.lose_next_answer_to = {"pipelines/upload"}
    first = kfp_cli(example_project, "upload-pipeline", **token)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "as a new pipeline" in first.stdout and "the pipeline exists" in first.stderr
    [pipeline_id] = kfp.pipelines
    [version] = kfp.versions[pipeline_id]
    assert version["pipeline_version_id"] in first.stdout

    kfp.lose_next_answer_to = {"pipelines/upload_version"}
    second = kfp_cli(example_project, "upload-pipeline", "--tag", "release", **token)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "as a new version" in second.stdout and "the pipeline version exists" in second.stderr
    assert len(kfp.versions[pipeline_id]) == 2 and kfp.versions[pipeline_id][1]["pipeline_version_id"] in second.stdout
    assert not kfp.lose_next_answer_to

    # Another spec holds the version name (someone else's upload): a 409 is refused, never reused.
    import requests

    from kvx_runtime.targets.http import ApiError
    from kvx_runtime.targets.kubeflow import KubeflowTarget

    taken = kfp.versions[pipeline_id][1]
    stored = json.loads(json.dumps(taken["pipeline_spec"]))
    spec_file = example_project / "other.yaml"
    spec_file.write_text(json.dumps({**taken["pipeline_spec"], "sdkVersion": "someone-else"}))
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {BEARER_TOKEN}"
    target = KubeflowTarget(kfp.url, namespace="team-a", session=session, attempts=2)
    with pytest.raises(ApiError, match=f"version {taken['display_name']} exists") as refused:
        target.upload_pipeline(kfp.pipelines[pipeline_id]["display_name"], str(spec_file), taken["display_name"])
    assert refused.value.exit_code == 2
    assert len(kfp.versions[pipeline_id]) == 2 and kfp.versions[pipeline_id][1]["pipeline_spec"] == stored


@pytest.mark.parametrize(("host", "problem", "code"), [
    ("http://127.0.0.1:{port}/", "answered GET /apis/v2beta1/experiments with text/html, not the API's JSON", 2),
    ("http://127.0.0.1:99999/pipeline", "is not an http(s) URL", 2),
    ("ftp://kubeflow.example.com/pipeline", "is not an http(s) URL", 2),
    ("http://127.0.0.1:9/pipeline", "did not answer", 3),
])
def test_a_host_that_is_not_the_kfp_api_is_one_clear_line(example_project: Path, kfp: FakeKfp, host: str,
                                                          problem: str, code: int) -> None:
    configure(example_project, kfp, host.format(port=kfp.port))
    ran = kfp_cli(example_project, "list-pipelines", KF_PIPELINES_TOKEN=BEARER_TOKEN, KVX_API_ATTEMPTS="2")
    assert ran.returncode == code
    errors = [json.loads(line) for line in ran.stderr.splitlines() if line.startswith("{")]
    assert len([e for e in errors if e.get("severity") == "ERROR"]) == 1
    assert any(problem in e["message"] for e in errors), errors
    assert "Traceback" not in ran.stderr and BEARER_TOKEN not in ran.stderr + ran.stdout
