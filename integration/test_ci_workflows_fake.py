"""The push and main-branch jobs of the workflows `init --with-github-actions` writes, their
shell steps run as GitHub's runner would (integration/github_runner.py) against the fake
Vertex AI API and the fake Kubeflow Pipelines API. The fake Google token endpoint stands in for
the auth action's credentials."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from integration.conftest import step_env
from integration.fake_kfp import DEX_PASSWORD, DEX_USER, FakeKfp
from integration.fake_vertex import FakeVertex
from integration.github_runner import run_job
from kvx_runtime.cli import cli

pytestmark = pytest.mark.slow

PROJECT_ID, REGION = "kvx-example-project", "europe-west1"
SHA = "0123456789abcdef0123456789abcdef01234567"


def copy_raw_inputs(project: Path, config: Path, filesystem: Any) -> None:
    """What `init --cloud-env` says to do before the first run (run-once refuses a run whose
    inputs are missing): the raw inputs copied under the storage root."""
    root = str(yaml.safe_load(config.read_text())["run_config"]["root"])
    under = root.split("://", 1)[-1].rstrip("/")
    bucket = under.split("/", 1)[0]
    if not filesystem.exists(bucket):
        filesystem.mkdir(bucket)
    for path in sorted((project / "data" / "01_raw").iterdir()):
        filesystem.pipe_file(f"{under}/data/01_raw/{path.name}", path.read_bytes())


@pytest.fixture
def vertex(fake_google):
    fake = FakeVertex(fake_google, project=PROJECT_ID, region=REGION).start()
    yield fake
    fake.stop()


def vertex_workflow(root: Path, vertex: FakeVertex, extra_config: str = "") -> dict[str, Any]:
    """The example project initialised for Vertex AI with the workflows (and a cloud env); the
    pipeline workflow as parsed YAML."""
    config = root / "conf" / "base" / "vertexai.yml"
    config.write_text(config.read_text().replace("run_config:\n", (
        "run_config:\n"
        f"  template_repository: {vertex.url}/kfp/{PROJECT_ID}/pipelines\n"
        "  schedules:\n    default_schedule:\n      cron_expression: '0 3 * * *'\n" + extra_config), 1))
    result = CliRunner().invoke(cli, ["init", "--project-path", str(root), "--with-github-actions", "--cloud-env",
                                      "cloud"])
    assert result.exit_code == 0, result.output
    (root / "conf" / "local" / "mlflow.yml").unlink()  # compile --strict: MLflow config the steps would not read
    return yaml.safe_load((root / ".github" / "workflows" / "kvx-pipeline.yml").read_text())


def vertex_job_env(evaluated: dict[str, str], vertex: FakeVertex, fake_google, tmp_path: Path,
                   **extra: str) -> dict[str, str]:
    """A job's environment: the workflow's env block as GitHub evaluated it, Google credentials of
    the fake token endpoint (what the auth action leaves), the fake Vertex AI API."""
    from integration.test_mlflow import _service_account_key

    adc = _service_account_key(tmp_path / "adc.json", f"{fake_google.url}/token",
                               "deployer@kvx-test.iam.gserviceaccount.com")
    env = step_env(**evaluated, GITHUB_SHA=SHA, KVX_VERTEX_ENDPOINT=vertex.url,
                   GOOGLE_APPLICATION_CREDENTIALS=str(adc), KVX_VERTEX_RETRY_WAIT="0.05", **extra)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    return env


def test_the_push_and_main_branch_jobs_run_upload_and_schedule_on_vertex(example_project: Path, vertex: FakeVertex,
                                                                           fake_google, gcs_emulator,
                                                                           tmp_path: Path) -> None:
    root = example_project
    workflow = vertex_workflow(root, vertex)
    # The workflow's env block as GitHub would evaluate it for a push of SHA to main, no variables set.
    evaluated = {"IMAGE_REPOSITORY": "europe-docker.pkg.dev/kvx-example-project/images/spaceflights-kvx",
                 "KEDRO_CONFIG_COMMIT_ID": SHA, "CODE_UPLOAD": "false", "ON_MAIN_BRANCH": "true",
                 "PYTHON_VERSION": "3.11", "KEDRO_ENV": "cloud"}
    assert set(evaluated) == set(workflow["env"])
    assert workflow["env"]["KEDRO_ENV"] == "cloud"  # the cloud env init wrote with the workflows
    copy_raw_inputs(root, root / "conf" / "base" / "vertexai.yml", gcs_emulator.filesystem())
    env = vertex_job_env(evaluated, vertex, fake_google, tmp_path, **gcs_emulator.env)

    run_summary = run_job(root, workflow["jobs"]["run-once"], env, tmp_path / "run-once")
    [job] = vertex.jobs.values()
    assert f"{evaluated['IMAGE_REPOSITORY']}:{SHA}" in str(job["pipelineSpec"])
    assert f"### Run of {SHA[:7]} on Vertex AI" in run_summary
    assert "Console: <https://console.cloud.google.com/vertex-ai/" in run_summary

    deploy_summary = run_job(root, workflow["jobs"]["deploy"], env, tmp_path / "deploy")
    assert {tag for _, tag in vertex.templates} >= {SHA, "latest"}
    [schedule] = vertex.schedules.values()
    assert schedule["cron"].endswith("0 3 * * *")
    assert f"### {SHA[:7]} deployed to Vertex AI" in deploy_summary and "Uploaded as" in deploy_summary
    assert "Console: <https://console.cloud.google.com/vertex-ai/pipelines/runs?project=" in deploy_summary


def test_a_code_upload_push_runs_the_pushed_code_on_the_latest_image(example_project: Path, vertex: FakeVertex,
                                                                      fake_google, gcs_emulator,
                                                                      tmp_path: Path) -> None:
    """A push off the main branch with the KVX_CODE_UPLOAD variable: no image is built; run-once
    uploads the code archive to the storage root (the GCS emulator) and the steps run the main
    branch's latest image with it."""
    root = example_project
    workflow = vertex_workflow(root, vertex)
    config = root / "conf" / "base" / "vertexai.yml"
    config.write_text(config.read_text().replace("root: kvx-example-bucket/pipelines",
                                                 f"root: {gcs_emulator.bucket}/pipelines"))
    evaluated = {"IMAGE_REPOSITORY": "europe-docker.pkg.dev/kvx-example-project/images/spaceflights-kvx",
                 "KEDRO_CONFIG_COMMIT_ID": SHA, "CODE_UPLOAD": "true", "ON_MAIN_BRANCH": "false",
                 "PYTHON_VERSION": "3.11", "KEDRO_ENV": "cloud"}
    copy_raw_inputs(root, config, gcs_emulator.filesystem())
    env = vertex_job_env(evaluated, vertex, fake_google, tmp_path, **gcs_emulator.env)
    # The image job's steps are all skipped (`if: env.CODE_UPLOAD != 'true'`): nothing is built.
    assert all(step.get("if") == "env.CODE_UPLOAD != 'true'" for step in workflow["jobs"]["image"]["steps"])
    assert "deploy" not in [name for name, job in workflow["jobs"].items() if "if" not in job]

    summary = run_job(root, workflow["jobs"]["run-once"], env, tmp_path / "run-once")
    [job] = vertex.jobs.values()
    spec = str(job["pipelineSpec"])
    assert f"{evaluated['IMAGE_REPOSITORY']}:latest" in spec and f"{evaluated['IMAGE_REPOSITORY']}:{SHA}" not in spec
    archives = [path for path in gcs_emulator.filesystem().find(f"{gcs_emulator.bucket}/pipelines")
                if "code" in path and path.endswith((".tar.gz", ".tgz"))]
    assert archives, "no code archive under the storage root"
    assert "--code" in spec and archives[0].rsplit("/", 1)[-1] in spec
    assert "with the uploaded code" in summary and "Console: <https://console.cloud.google.com/vertex-ai/" in summary


IAP_CLIENT = "kvx-kfp-iap-client.apps.googleusercontent.com"
#: The repository variable KVX_IMAGE_REPOSITORY: the image kfp init and airflow init write names no registry.
VARIABLE_IMAGE_REPOSITORY = "registry.example.com/team-a/spaceflights-kvx"
DEPLOYER = "kvx-deployer@kvx-test.iam.gserviceaccount.com"


@pytest.fixture
def kfp(request):
    fake = FakeKfp(auth=request.param, audience=IAP_CLIENT).start()
    yield fake
    fake.stop()


@pytest.mark.parametrize(("kfp", "github_auth"), [("iap", "workload-identity"), ("dex", "key")],
                         indirect=["kfp"])
def test_the_push_and_main_branch_jobs_run_upload_and_schedule_on_kubeflow(example_project: Path, kfp: FakeKfp,
                                                                             github_auth: str, fake_google, s3_server,
                                                                             tmp_path: Path) -> None:
    """KFP behind IAP with Workload Identity Federation (init's defaults): the auth action's ID
    token for the IAP client id reaches the client through $GITHUB_ENV as KF_PIPELINES_TOKEN.
    KFP behind Dex with a service-account key: the Dex secrets reach it as the job's env."""
    root = example_project
    (root / "conf" / "base" / "vertexai.yml").unlink()  # kubeflow.yml instead
    result = CliRunner().invoke(cli, ["kfp", "init", "--project-path", str(root), kfp.url, "--namespace", "team-a",
                                      "--with-github-actions", "--github-auth", github_auth, "--cloud-env", "cloud"])
    assert result.exit_code == 0, result.output
    config = root / "conf" / "base" / "kubeflow.yml"
    config.write_text(config.read_text().replace("run_config:\n", (
        "run_config:\n  schedules:\n    default_schedule:\n      cron_expression: '0 3 * * *'\n"), 1))
    (root / "conf" / "local" / "mlflow.yml").unlink()  # compile --strict: MLflow config the steps would not read
    workflow = yaml.safe_load((root / ".github" / "workflows" / "kvx-pipeline.yml").read_text())

    # The workflow's env block as GitHub would evaluate it for a push of SHA to main, the
    # variable KVX_IMAGE_REPOSITORY set.
    evaluated = {"IMAGE_REPOSITORY": VARIABLE_IMAGE_REPOSITORY, "KEDRO_CONFIG_COMMIT_ID": SHA, "CODE_UPLOAD": "false",
                 "ON_MAIN_BRANCH": "true", "PYTHON_VERSION": "3.11", "KEDRO_ENV": "cloud"}
    assert set(evaluated) == set(workflow["env"])
    assert workflow["env"]["KEDRO_ENV"] == "cloud"  # the cloud env init wrote with the workflows
    # The jobs' env (the secrets of one auth mode set) and, with IAP, what the ID-token step
    # (the auth action) hands the next one.
    if kfp.auth == "iap":
        known = {"secrets.IAP_CLIENT_ID": IAP_CLIENT, "secrets.DEX_USERNAME": "", "secrets.DEX_PASSWORD": "",
                 "steps.iap.outputs.id_token != ''": "true",
                 "steps.iap.outputs.id_token": fake_google.id_token(IAP_CLIENT, DEPLOYER)}
    else:
        known = {"secrets.IAP_CLIENT_ID": "", "secrets.DEX_USERNAME": DEX_USER, "secrets.DEX_PASSWORD": DEX_PASSWORD}
    # No Google credentials (IAP: only the step's ID token, which the client must send, not mint its own).
    copy_raw_inputs(root, config, s3_server.filesystem())
    env = step_env(**evaluated, GITHUB_SHA=SHA, GOOGLE_APPLICATION_CREDENTIALS="",
                   NO_GCE_CHECK="True", GCE_METADATA_HOST="127.0.0.1:9", KVX_API_RETRY_WAIT="0.05",
                   KVX_WATCH_INTERVAL="0.05", **s3_server.env)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    ui = f"{kfp.url.removesuffix('/pipeline')}/_/pipeline/#/runs"

    run_summary = run_job(root, workflow["jobs"]["run-once"], env, tmp_path / "run-once", known)
    [run] = kfp.runs.values()
    assert f"{VARIABLE_IMAGE_REPOSITORY}:{SHA}" in str(run)
    assert f"### Run of {SHA[:7]} on Kubeflow Pipelines" in run_summary
    assert f"Console: <{ui}/details/{run['run_id']}>" in run_summary

    deploy_summary = run_job(root, workflow["jobs"]["deploy"], env, tmp_path / "deploy", known)
    [pipeline_id] = kfp.pipelines
    [version] = kfp.versions[pipeline_id]
    assert f"{VARIABLE_IMAGE_REPOSITORY}:{SHA}" in str(version)
    [recurring] = kfp.recurring.values()
    assert recurring["trigger"]["cron_schedule"]["cron"] == "0 0 3 * * *"
    assert f"{VARIABLE_IMAGE_REPOSITORY}:{SHA}" in str(recurring)
    assert f"### {SHA[:7]} deployed to Kubeflow Pipelines" in deploy_summary and "as a new pipeline" in deploy_summary
    assert f"Console: <{ui}>" in deploy_summary
    assert kfp.problems == [] and (kfp.logins > 0) == (kfp.auth == "dex")


@pytest.mark.airflow
@pytest.mark.xdist_group("ci-workflows-airflow")  # its own Airflow deployment (module-scoped fixture)
def test_the_push_and_main_branch_jobs_run_upload_and_schedule_on_airflow(example_project: Path, airflow_server: Any,
                                                                            gcs_emulator, tmp_path: Path) -> None:
    """Airflow's own login: the user and password secrets reach the client as the job's env."""
    root, dag_id = example_project, "ci-kvx"
    (root / "conf" / "base" / "vertexai.yml").unlink()  # airflow-k8s.yml instead
    result = CliRunner().invoke(cli, ["airflow", "init", "--project-path", str(root), airflow_server.url,
                                      "--with-github-actions", "--cloud-env", "cloud"])
    assert result.exit_code == 0, result.output
    config = root / "conf" / "base" / "airflow-k8s.yml"
    config.write_text(config.read_text().replace("run_config:\n", (
        f"run_config:\n  dags_folder: {airflow_server.dags_folder}\n  schedule: '0 3 * * *'\n"
        "  start_date: 2030-01-01\n"), 1))
    config.write_text(re.sub(r"(?m)^  dag_id: .*$", f"  dag_id: {dag_id}", config.read_text(), count=1))
    (root / "conf" / "local" / "mlflow.yml").unlink()  # compile --strict: MLflow config the steps would not read
    workflow = yaml.safe_load((root / ".github" / "workflows" / "kvx-pipeline.yml").read_text())

    evaluated = {"IMAGE_REPOSITORY": VARIABLE_IMAGE_REPOSITORY, "KEDRO_CONFIG_COMMIT_ID": SHA, "CODE_UPLOAD": "false",
                 "ON_MAIN_BRANCH": "true", "PYTHON_VERSION": "3.11", "KEDRO_ENV": "cloud"}
    assert set(evaluated) == set(workflow["env"])
    assert workflow["env"]["KEDRO_ENV"] == "cloud"  # the cloud env init wrote with the workflows
    known = {"secrets.KVX_AIRFLOW_TOKEN": "", "secrets.KVX_AIRFLOW_USERNAME": airflow_server.username,
             "secrets.KVX_AIRFLOW_PASSWORD": airflow_server.password}
    copy_raw_inputs(root, config, gcs_emulator.filesystem())
    env = step_env(**evaluated, GITHUB_SHA=SHA, KVX_API_RETRY_WAIT="0.2", KVX_WATCH_INTERVAL="1", **gcs_emulator.env)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    image = f"{VARIABLE_IMAGE_REPOSITORY}:{SHA}"

    run_summary = run_job(root, workflow["jobs"]["run-once"], env, tmp_path / "run-once", known)
    run_dag = f"{dag_id}-run-once"  # run-once of a scheduled project: its copy without the schedule
    assert image in (airflow_server.dags_folder / f"{run_dag}.py").read_text()
    status, runs = airflow_server.api("GET", f"/api/v2/dags/{run_dag}/dagRuns")
    assert status == 200 and runs["total_entries"] == 1, (status, runs)
    run_id = runs["dag_runs"][0]["dag_run_id"]
    assert f"### Run of {SHA[:7]} on Airflow" in run_summary
    assert f"Console: <{airflow_server.url}/dags/{run_dag}/runs/{run_id}>" in run_summary

    deploy_summary = run_job(root, workflow["jobs"]["deploy"], env, tmp_path / "deploy", known)
    dag_file = (airflow_server.dags_folder / f"{dag_id}.py").read_text()
    assert image in dag_file and 'schedule="0 3 * * *"' in dag_file
    status, details = airflow_server.api("GET", f"/api/v2/dags/{dag_id}")
    assert status == 200 and details["is_paused"] is False, (status, details)
    assert f"### {SHA[:7]} deployed to Airflow" in deploy_summary
    assert f"DAG {dag_id} created from" in deploy_summary and f"Schedule {dag_id} " in deploy_summary
    assert f"Console: <{airflow_server.url}/dags/{dag_id}>" in deploy_summary
    assert airflow_server.password not in run_summary + deploy_summary
