"""Steps as Kubeflow Pipelines runs them: the same compiled spec, an ``s3://`` storage root
(MinIO on a self-hosted KFP; here moto's S3 server on 127.0.0.1), the job's placeholders
filled the way KFP fills them, and the pipeline's one MLflow run tagged ``kubeflow_run_id``.

KFP's pods are recognized by ``KFP_POD_NAME`` (set by KFP v2 in every step's main container),
which these tests set; everything else is the real runtime, run-local and servers.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from integration.conftest import KVX, kedro_in_process, run_step, step_env
from integration.test_exec_node import EXPECTED_BLOBS
from kvx_runtime.storage.store import BlobStore

pytestmark = pytest.mark.slow

KFP_POD = {"KFP_POD_NAME": "spaceflights-kvx-x7k2p-system-container-impl-1234"}


def reports_of(project: Path, run_id: str) -> dict[str, str]:
    """The report files a run wrote (in the local env, metrics.json goes to MLflow instead)."""
    folder = project / "data" / "08_reporting" / run_id
    return {path.name: path.read_text() for path in folder.iterdir()}


def kvx(project: Path, *args: str, env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([*KVX, *args], cwd=project, env=env, capture_output=True, text=True, timeout=timeout)


def test_example_pipeline_on_s3_in_kfp_pods_equals_kedro_run_with_one_tagged_mlflow_run(
    example_project: Path, s3_server, mlflow_server, tmp_path: Path
) -> None:
    # The baseline: a plain `kedro run` in the same env (its MLflow datasets log to an embedded store).
    kedro_in_process(example_project, "run", "local", env=step_env(KEDRO_CONFIG_RUN_ID="clean"))
    root = f"s3://{s3_server.bucket}/kfp-e2e"
    env = step_env(**s3_server.env, **KFP_POD, KEDRO_CONFIG_MLFLOW_TRACKING_URI=mlflow_server.url)
    # A display name that every run of the uploaded pipeline may carry on KFP.
    ran = kvx(example_project, "run-local", "--env", "local", "--storage-root", root, "--job-name",
              "spaceflights-kvx", "--max-parallel", "2", env=env)
    assert ran.returncode == 0, ran.stdout[-3000:] + ran.stderr[-3000:]
    status = json.loads((example_project / ".kvx" / "runs" / "spaceflights-kvx" / "status.json").read_text())
    run_uuid = status["run_id"]

    ours, clean = reports_of(example_project, run_uuid), reports_of(example_project, "clean")
    assert set(ours) == set(clean) == {"importance.csv", "report_dirty.md", "shuttle_summary.csv"}
    # kedro-mlflow's hook (off in the baseline) prefixes metric names with their dataset's name.
    ours["report_dirty.md"] = ours["report_dirty.md"].replace("- metrics.", "- ")
    assert ours == clean
    # Blobs live under the display name made unique by the run's uuid, and read back intact.
    store = BlobStore(root, f"spaceflights-kvx-{run_uuid}")
    for blob in EXPECTED_BLOBS:
        store.load(blob)
    assert not s3_server.filesystem().exists(f"{s3_server.bucket}/kfp-e2e/kedro-vertexai-temp/spaceflights-kvx")

    client = mlflow_server.client()
    experiment = client.get_experiment_by_name("spaceflights-kvx")
    runs = client.search_runs([experiment.experiment_id], filter_string=f"tags.kubeflow_run_id = '{run_uuid}'")
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.tags["vertexai_job_name"] == f"spaceflights-kvx-{run_uuid}"
    # In the local env the metrics go to MLflow (and into the report, equal to kedro run's).
    reported = dict(line[2:].split(": ") for line in clean["report_dirty.md"].splitlines()
                    if line.startswith("- ") and ":" in line and line[2:].split(":")[0] in {"mae", "r2_score"})
    assert len(reported) == 2 and {n: run.data.metrics[f"metrics.{n}"] for n in reported} == pytest.approx(
        {name: float(value) for name, value in reported.items()})
    # The access key's secret appears in no step log.
    logs = "".join(p.read_text() for p in (example_project / ".kvx" / "runs" / "spaceflights-kvx" / "logs").glob("*"))
    assert s3_server.env["AWS_SECRET_ACCESS_KEY"] not in logs + ran.stdout + ran.stderr


def test_two_kfp_runs_with_one_display_name_never_share_intermediates(example_project: Path, s3_server) -> None:
    root = f"s3://{s3_server.bucket}/kfp-shared-name"
    env = step_env(**s3_server.env, **KFP_POD)
    node = "data_processing.preprocess_companies_node"
    for uuid in ("0b5c-run-a", "7e21-run-b"):
        result = run_step(example_project, "--node", node, "--run-id", uuid, "--job-name", "same-display-name",
                          "--storage-root", root, "--env", "base", env=env)
        assert result.returncode == 0, result.stderr[-3000:]
    fs = s3_server.filesystem()
    jobs = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"{s3_server.bucket}/kfp-shared-name/kedro-vertexai-temp"))
    assert jobs == ["same-display-name-0b5c-run-a", "same-display-name-7e21-run-b"]


@pytest.mark.kedro
def test_unfilled_create_time_the_job_directory_records_one_version_for_the_run(tmp_path: Path) -> None:
    """KFP's recurring and UI-started runs leave ``{{$.pipeline_job_create_time_utc}}`` unfilled
    and carry no kvx_save_version: the first step records the run's version in the job
    directory and the others read it, so a versioned dataset passes between steps at one
    version. Without a storage root, a step passing one refuses (exit 2) rather than read
    another run's; ``--save-version`` still wins."""
    from integration.conftest import make_project

    nodes = "def make():\n    return [1, 2, 3]\n\ndef total(values):\n    return sum(values)\n"
    pipeline = (
        "from kedro.pipeline import Node, Pipeline\n"
        "from vproj.nodes import make, total\n\n"
        "def register_pipelines():\n"
        "    p = Pipeline([Node(make, None, 'values', name='make'), Node(total, 'values', 'sum', name='total')])\n"
        "    return {'__default__': p}\n"
    )
    catalog = "values:\n  type: pickle.PickleDataset\n  filepath: data/values.pkl\n  versioned: true\n"
    project = make_project(tmp_path, "vproj", nodes, pipeline, catalog)
    unfilled = ["--save-version", "", "--job-create-time", "{{$.pipeline_job_create_time_utc}}"]
    root = tmp_path / "s"
    for node in ("make", "total"):
        result = run_step(project, "--node", node, "--run-id", "r-1", "--storage-root", str(root), "--env", "base",
                          *unfilled, env=step_env(**KFP_POD))
        assert result.returncode == 0, result.stderr[-3000:]
    (version,) = [p.name for p in (project / "data" / "values.pkl").iterdir()]
    record = json.loads((root / "kedro-vertexai-temp" / "r-1" / "run-version.json").read_text())
    assert record == {"format": 1, "run_id": "r-1", "save_version": version}
    # The second step loaded the first step's version (it would fail on any other).
    assert "versioned inputs load this run's version" in result.stderr and version in result.stderr

    # Two runs in one job directory (a job name reused outside KFP): refused, nothing saved.
    shared = ["--job-name", "reused", "--storage-root", str(root), "--env", "base", *unfilled]
    assert run_step(project, "--node", "make", "--run-id", "r-2", *shared).returncode == 0
    clash = run_step(project, "--node", "make", "--run-id", "r-3", *shared)
    assert clash.returncode == 2 and "two runs share one job directory" in clash.last_message
    assert len(list((project / "data" / "values.pkl").iterdir())) == 2

    # No storage root: nowhere to record it.
    refused = run_step(project, "--node", "make", "--run-id", "r-4", "--env", "base", *unfilled,
                       env=step_env(**KFP_POD))
    assert refused.returncode == 2
    assert "did not fill the job's creation time" in refused.last_message
    assert "values" in refused.last_message and "run_config.root" in refused.last_message
    explicit = ["--run-id", "r-5", "--env", "base", "--save-version", "2026-11-24T10:00:00Z",
                "--job-create-time", "{{$.pipeline_job_create_time_utc}}"]
    for node in ("make", "total"):
        result = run_step(project, "--node", node, *explicit, env=step_env(**KFP_POD))
        assert result.returncode == 0, result.stderr[-3000:]
    assert "2026-11-24T10.00.00.000Z" in [p.name for p in (project / "data" / "values.pkl").iterdir()]


def test_run_config_s3_alone_reaches_the_store_for_code_archives_and_gc(s3_server, tmp_path: Path) -> None:
    """MinIO configured only in run_config.s3 (no AWS_ENDPOINT_URL): steps fetch the code archive
    before they read the project's config, so the compiled spec carries the endpoint; `gc` with
    an s3:// root given outright uses the project's."""
    from integration.conftest import make_project

    root = f"s3://{s3_server.bucket}/s3-config-only"
    vertexai = (f"run_config:\n  image: img\n  root: {root}\n  code_upload: true\n"
                f"  s3: {{endpoint_url: '{s3_server.url}', region: us-east-1}}\n")
    nodes = "def make():\n    return [1, 2, 3]\n\ndef total(values):\n    return sum(values)\n"
    pipeline = (
        "from kedro.pipeline import Node, Pipeline\n"
        "from s3proj.nodes import make, total\n\n"
        "def register_pipelines():\n"
        "    p = Pipeline([Node(make, None, 'values', name='make'), Node(total, 'values', 'sum', name='total')])\n"
        "    return {'__default__': p}\n"
    )
    project = make_project(tmp_path, "s3proj", nodes, pipeline, vertexai=vertexai)
    credentials_only = {k: v for k, v in s3_server.env.items() if not k.startswith("AWS_ENDPOINT")}
    env = {k: v for k, v in step_env(**credentials_only, **KFP_POD).items() if not k.startswith("AWS_ENDPOINT")}
    compiled = kvx(project, "compile", "--env", "base", "-o", str(tmp_path / "p.json"), env=env)
    assert compiled.returncode == 0, compiled.stderr[-3000:]
    spec = json.loads((tmp_path / "p.json").read_text())
    for executor in spec["deploymentSpec"]["executors"].values():
        container_env = {e["name"]: e["value"] for e in executor["container"].get("env", [])}
        assert container_env["KVX_S3_ENDPOINT_URL"] == s3_server.url
        assert container_env["KVX_S3_REGION"] == "us-east-1"
    ran = kvx(project, "run-local", str(tmp_path / "p.json"), "--job-name", "s3-only", "--storage-root", root, env=env)
    assert ran.returncode == 0, ran.stdout[-3000:] + ran.stderr[-3000:]
    step_logs = "".join(p.read_text() for p in (project / ".kvx" / "runs" / "s3-only" / "logs").glob("*"))
    assert "code archive" in step_logs and s3_server.bucket in step_logs

    fs = s3_server.filesystem()
    jobs = fs.ls(f"{s3_server.bucket}/s3-config-only/kedro-vertexai-temp", detail=False)
    assert len(jobs) == 1 and jobs[0].rsplit("/", 1)[-1].startswith("s3-only-")
    listed = kvx(project, "gc", "--env", "base", "--storage-root", root, "--older-than", "0", env=env)
    assert listed.returncode == 0, listed.stderr[-3000:]
    assert jobs[0].rsplit("/", 1)[-1] in listed.stdout
