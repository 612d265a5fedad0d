"""The Airflow journey against a real Airflow 3 deployment on 127.0.0.1 (API server, scheduler
with the LocalExecutor, DAG processor: integration/airflow_server.py): ``kvx-runtime airflow``
``run-once --wait``, ``status``, ``list-pipelines``, ``ui``, ``cancel``, ``schedule`` (with
``--pause``, ``--resume``, ``--delete``) and ``upload-pipeline`` (to a ``gs://`` DAGs folder on the
GCS emulator, synced to Airflow's folder as Cloud Composer syncs its bucket), each through
Airflow's REST API with Airflow's own login (JWT), and the bad inputs: one line, the documented
exit code. The example project's ``--operator local`` DAG: its tasks run ``kvx-runtime exec-node``
from this checkout, tracked by the session's MLflow server.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from conftest import REPO, free_port
from integration.conftest import KVX, REPORT_FILES, MlflowServer, step_env

# One Airflow deployment per module, its tests on one xdist worker (their own group, --dist loadgroup).
pytestmark = [pytest.mark.slow, pytest.mark.airflow, pytest.mark.xdist_group("airflow-journey")]

DAG_ID = "journey-kvx"


@dataclass(frozen=True)
class Journey:
    project: Path
    server: Any  # integration.airflow_server.AirflowServer
    storage: Path

    def env(self, **extra: str) -> dict[str, str]:
        return step_env(**{"KVX_AIRFLOW_USERNAME": self.server.username, "KVX_AIRFLOW_PASSWORD": self.server.password,
                           "KVX_WATCH_INTERVAL": "1", "KVX_API_RETRY_WAIT": "0.2",
                           "KEDRO_CONFIG_MLFLOW_TRACKING_URI": self.server.env["KEDRO_CONFIG_MLFLOW_TRACKING_URI"],
                           **extra})

    def kvx(self, *args: str, timeout: float = 900, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*KVX, "airflow", *args], cwd=self.project, env=self.env(**extra),
                              capture_output=True, text=True, timeout=timeout)

    def configure(self, env: str, dag_id: str, dags_folder: str, extra: str = "", host: str | None = None) -> None:
        folder = self.project / "conf" / env
        folder.mkdir(exist_ok=True)
        (folder / "airflow-k8s.yml").write_text(
            f"host: {host or self.server.url}\nrun_config:\n  image: unused:1\n  root: {self.storage}\n"
            f"  dag_id: {dag_id}\n  dags_folder: {dags_folder}\n{extra}")
        if env != "local":  # the MLflow set-up of the example is its laptop env's
            shutil.copy(self.project / "conf" / "local" / "mlflow.yml", folder / "mlflow.yml")


@pytest.fixture(scope="module")
def journey(tmp_path_factory: pytest.TempPathFactory, airflow_server: Any) -> Journey:
    root = tmp_path_factory.mktemp("journey")
    project = root / "example"
    shutil.copytree(REPO / "integration" / "example_project", project,
                    ignore=shutil.ignore_patterns(".kvx", "__pycache__", "mlruns", "08_reporting"))
    journey = Journey(project=project, server=airflow_server, storage=root / "storage")
    journey.configure("local", DAG_ID, str(airflow_server.dags_folder))
    return journey


def api_get(journey: Journey, path: str) -> Any:
    status, body = journey.server.api("GET", path)
    assert status == 200, (status, body)
    return body


def last_line(result: subprocess.CompletedProcess[str]) -> str:
    return json.loads(result.stderr.strip().splitlines()[-1])["message"]


def mlflow_runs(mlflow_server: MlflowServer, airflow_run_id: str) -> list[Any]:
    client = mlflow_server.client()
    experiment = client.get_experiment_by_name("spaceflights-kvx")
    return client.search_runs([experiment.experiment_id], filter_string=f"tags.airflow_run_id = '{airflow_run_id}'")


def submitted(result: subprocess.CompletedProcess[str]) -> tuple[str, str]:
    [line] = [line for line in result.stdout.splitlines() if line.startswith("Submitted ")]
    dag_id, _, run_id = line.removeprefix("Submitted ").partition("/")
    return dag_id, run_id


def ended(journey: Journey, dag_id: str, run_id: str, timeout: float = 180) -> dict[str, Any]:
    """The run once it has ended (a cancelled run ends after its exit tasks)."""
    deadline = time.monotonic() + timeout
    while True:
        run = api_get(journey, f"/api/v2/dags/{dag_id}/dagRuns/{run_id}")
        if run["state"] in ("success", "failed") or time.monotonic() > deadline:
            return run
        time.sleep(1)


def test_cancel_stops_the_body_and_the_exit_tasks_end_the_mlflow_run(journey: Journey,
                                                                     mlflow_server: MlflowServer) -> None:
    # Marking the run failed would skip its exit tasks: the MLflow run left RUNNING for good.
    once = journey.kvx("run-once", "--env", "local", "--operator", "local", "--no-wait")
    assert once.returncode == 0, once.stderr[-3000:]
    dag_id, run_id = submitted(once)
    path = f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # the MLflow run made, the body under way
        states = {task["task_id"]: task["state"] for task in api_get(journey, path)["task_instances"]}
        if states.get("mlflow-start-run") == "success":
            break
        time.sleep(0.5)
    cancelled = journey.kvx("cancel", "--env", "local", f"{dag_id}/{run_id}")
    assert cancelled.returncode == 0, cancelled.stderr[-2000:]
    run = ended(journey, dag_id, run_id)
    assert run["state"] == "failed", run
    states = {task["task_id"]: task["state"] for task in api_get(journey, path)["task_instances"]}
    assert states["mlflow-end-run"] == "success" and "reporting-build-report-node" not in \
        [task for task, state in states.items() if state == "success"], states
    [mlflow_run] = mlflow_runs(mlflow_server, run_id)
    assert mlflow_run.info.status == "FAILED" and mlflow_run.data.tags["kvx.final_state"] == "FAILED"


def test_run_once_waits_for_a_run_that_makes_what_kedro_run_makes(
        journey: Journey, mlflow_server: MlflowServer, kedro_run_reports: dict[str, str]) -> None:
    result = journey.kvx("run-once", "--env", "local", "--operator", "local", "--wait")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    dag_id, run_id = submitted(result)
    assert dag_id == DAG_ID and f"{journey.server.url}/dags/{DAG_ID}/runs/{run_id}" in result.stdout
    assert "SUCCEEDED" in result.stdout
    produced = journey.project / "data" / "08_reporting" / run_id
    # Env local sends the metrics to MLflow (no metrics.json); the rest is kedro run's.
    for name in (name for name in REPORT_FILES if name != "metrics.json"):
        text = (produced / name).read_text()
        if name.startswith("report"):  # env local reads the metrics back from MLflow, named as there
            text = text.replace("- metrics.", "- ")
        assert text == kedro_run_reports[name], name
    [mlflow_run] = mlflow_runs(mlflow_server, run_id)
    assert mlflow_run.info.status == "FINISHED" and mlflow_run.data.tags["kvx.final_state"] == "SUCCEEDED"
    # No credential in anything printed.
    assert journey.server.password not in result.stdout + result.stderr

    status = journey.kvx("status", "--env", "local", f"{DAG_ID}/{run_id}")
    assert status.returncode == 0, status.stderr[-2000:]
    assert status.stdout.startswith(f"{run_id}: SUCCEEDED")
    assert "SUCCEEDED  reporting-build-report-node" in status.stdout
    # A bare run id is this project's DAG's run.
    assert journey.kvx("status", "--env", "local", run_id).returncode == 0
    listed = journey.kvx("list-pipelines", "--env", "local")
    assert listed.returncode == 0 and run_id in listed.stdout and "SUCCEEDED" in listed.stdout
    ui = journey.kvx("ui", "--env", "local")
    assert ui.stdout.strip() == f"{journey.server.url}/dags/{DAG_ID}"
    # The plugin family's front-end: the same command through Kedro's CLI.
    kedro = subprocess.run([str(Path(sys.executable).parent / "kedro"), "airflow-k8s", "-e", "local", "status",
                            f"{DAG_ID}/{run_id}"], cwd=journey.project, env=journey.env(), capture_output=True,
                           text=True, timeout=300)
    # (Kedro's CLI may print its own log lines before the command's.)
    assert kedro.returncode == 0, kedro.stderr[-2000:]
    assert any(line.startswith(f"{run_id}: SUCCEEDED  ") for line in kedro.stdout.splitlines()), kedro.stdout


def test_a_failing_node_fails_run_once_with_the_task_its_log_tail_and_the_replay_command(
        journey: Journey, mlflow_server: MlflowServer) -> None:
    # The test size becomes a DAG param (the DAG file changes: Airflow parses the new version
    # before the run starts) and this run's conf sets it out of range: split_data raises.
    result = journey.kvx("run-once", "--env", "local", "--operator", "local", "--wait",
                         "--params", "data_science.model_options.test_size:float",
                         "--param", "data_science.model_options.test_size=7.5")
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    _, run_id = submitted(result)
    out = result.stdout
    assert "task data-science-split-data-node FAILED" in out
    assert "logs:    " + f"{journey.server.url}/dags/{DAG_ID}/runs/{run_id}/tasks/data-science-split-data-node" in out
    log_lines = [line for line in out.splitlines() if line.startswith("  log:")]
    assert log_lines, out
    replay = next(line for line in out.splitlines() if line.startswith("  replay:"))
    assert "kvx-runtime exec-node --node data_science.split_data_node --env local" in replay
    assert f"--run-id {run_id}" in replay or f"--run-id '{run_id}'" in replay
    assert "--param data_science.model_options.test_size:float=7.5" in replay
    assert last_line(result).startswith(f"kvx-runtime airflow run-once failed: pipeline run {run_id} FAILED")
    [mlflow_run] = mlflow_runs(mlflow_server, run_id)
    assert mlflow_run.info.status == "FAILED"
    assert mlflow_run.data.tags["kvx.failed_node"] == "data_science.split_data_node"


def test_resume_reruns_the_failed_tasks_within_the_same_run_once_the_node_is_fixed(
        journey: Journey, mlflow_server: MlflowServer, kedro_run_reports: dict[str, str]) -> None:
    nodes = next((journey.project / "src").glob("*/pipelines/data_science/nodes.py"))
    working = nodes.read_text()
    first_line = '    features = data[options["features"]].astype(float)\n'
    assert first_line in working
    nodes.write_text(working.replace(first_line, '    raise RuntimeError("broken until fixed")\n' + first_line))
    try:
        failed = journey.kvx("run-once", "--env", "local", "--operator", "local", "--wait")
    finally:
        nodes.write_text(working)  # the fix
    assert failed.returncode == 1, failed.stdout[-3000:] + failed.stderr[-3000:]
    _, run_id = submitted(failed)

    resumed = journey.kvx("resume", "--env", "local", f"{DAG_ID}/{run_id}", "--wait")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"Resuming {DAG_ID}/{run_id} in place: " in resumed.stdout and "SUCCEEDED" in resumed.stdout
    # The resume recorded its activity in the run's job directory (gc keeps a job at work).
    from kvx_runtime.step.orchestrator import Airflow

    job = journey.storage / "kedro-vertexai-temp" / Airflow().job_directory_name(DAG_ID, run_id)
    assert json.loads((job / "activity" / "resume.json").read_text())["who"] == "resume"
    tries = {item["task_id"]: item["try_number"] for item in
             api_get(journey, f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances")["task_instances"]}
    assert tries["data-processing-preprocess-companies-node"] == 1  # finished: not run again
    assert tries["data-science-split-data-node"] == 2
    produced = journey.project / "data" / "08_reporting" / run_id
    assert (produced / "importance.csv").read_text() == kedro_run_reports["importance.csv"]
    [mlflow_run] = mlflow_runs(mlflow_server, run_id)  # the same MLflow run, ended again
    assert mlflow_run.info.status == "FINISHED" and mlflow_run.data.tags["kvx.final_state"] == "SUCCEEDED"

    again = journey.kvx("resume", "--env", "local", f"{DAG_ID}/{run_id}")
    assert again.returncode == 2 and "succeeded: nothing to resume" in last_line(again)


def test_schedule_publishes_the_dag_with_its_cron_then_pause_resume_delete(journey: Journey) -> None:
    scheduled = "journey-scheduled"
    journey.configure("sched", scheduled, str(journey.server.dags_folder),
                      "  schedule: '0 3 * * *'\n  start_date: 2030-01-01\n")  # no run before 2030
    created = journey.kvx("schedule", "--env", "sched", "--operator", "local")
    assert created.returncode == 0, created.stderr[-3000:]
    assert f"Schedule {scheduled} created: " in created.stdout and "(ACTIVE)" in created.stdout
    assert "next run after 2030-01-0" in created.stdout
    details = api_get(journey, f"/api/v2/dags/{scheduled}")
    assert details["is_paused"] is False and "0 3 * * *" in str(details["timetable_summary"])

    paused = journey.kvx("schedule", "--env", "sched", "--pause")
    assert paused.returncode == 0 and f"Schedule {scheduled}: PAUSED" in paused.stdout
    assert api_get(journey, f"/api/v2/dags/{scheduled}")["is_paused"] is True
    # A run not finished (queued: the DAG is paused) keeps --delete from removing anything.
    status, queued = journey.server.api("POST", f"/api/v2/dags/{scheduled}/dagRuns",
                                        {"logical_date": datetime.now(timezone.utc).isoformat(), "conf": {}})
    assert status == 200 and queued["state"] == "queued", queued
    busy = journey.kvx("schedule", "--env", "sched", "--delete")
    assert busy.returncode == 2, busy.stderr[-2000:]
    assert f"DAG {scheduled} has 1 run(s) not finished ({queued['dag_run_id']}...)" in last_line(busy)
    assert (journey.server.dags_folder / f"{scheduled}.py").exists()
    assert journey.kvx("cancel", "--env", "sched", f"{scheduled}/{queued['dag_run_id']}").returncode == 0
    resumed = journey.kvx("schedule", "--env", "sched", "--resume")
    assert resumed.returncode == 0 and f"Schedule {scheduled}: ACTIVE" in resumed.stdout

    # run-once of a scheduled project: its copy without the schedule, never the scheduled DAG.
    once = journey.kvx("run-once", "--env", "sched", "--operator", "local", "--no-wait")
    assert once.returncode == 0, once.stderr[-3000:]
    dag_id, run_id = submitted(once)
    assert dag_id == f"{scheduled}-run-once"
    assert "schedule=None" in (journey.server.dags_folder / f"{dag_id}.py").read_text()
    assert "schedule=\"0 3 * * *\"" in (journey.server.dags_folder / f"{scheduled}.py").read_text()
    cancelled = journey.kvx("cancel", "--env", "sched", f"{dag_id}/{run_id}")
    assert cancelled.returncode == 0, cancelled.stderr[-2000:]
    assert ended(journey, dag_id, run_id)["state"] == "failed"

    deleted = journey.kvx("schedule", "--env", "sched", "--delete")
    assert deleted.returncode == 0 and f"Schedule {scheduled}: deleted" in deleted.stdout
    assert not (journey.server.dags_folder / f"{scheduled}.py").exists()
    gone = journey.kvx("schedule", "--env", "sched", "--pause")
    assert gone.returncode == 2 and f"Airflow has no scheduled DAG {scheduled}" in last_line(gone)


def test_run_once_never_replaces_a_dag_scheduled_from_the_command_line(journey: Journey) -> None:
    # The schedule lives in the published DAG only (schedule --cron; none in the config): run-once
    # publishes its copy apart all the same, and a bare run id finds that copy's run.
    scheduled = "journey-cron"
    journey.configure("cron", scheduled, str(journey.server.dags_folder))
    created = journey.kvx("schedule", "--env", "cron", "--operator", "local", "--cron", "0 4 * * *",
                          "--start-date", "2030-01-01")
    assert created.returncode == 0, created.stderr[-3000:]
    once = journey.kvx("run-once", "--env", "cron", "--operator", "local", "--no-wait")
    assert once.returncode == 0, once.stderr[-3000:]
    dag_id, run_id = submitted(once)
    assert dag_id == f"{scheduled}-run-once"
    assert "0 4 * * *" in str(api_get(journey, f"/api/v2/dags/{scheduled}")["timetable_summary"])
    assert 'schedule="0 4 * * *"' in (journey.server.dags_folder / f"{scheduled}.py").read_text()
    status = journey.kvx("status", "--env", "cron", run_id)  # bare: the run-once copy's run, found by its id
    assert status.returncode == 0 and dag_id in status.stdout, status.stderr[-2000:]
    assert journey.kvx("cancel", "--env", "cron", f"{dag_id}/{run_id}").returncode == 0
    deleted = journey.kvx("schedule", "--env", "cron", "--delete")
    assert deleted.returncode == 0, deleted.stderr[-2000:]


@pytest.fixture
def composer_bucket_sync(journey: Journey, gcs_emulator: Any) -> Iterator[str]:
    """``gs://<bucket>/composer-dags``, copied into Airflow's DAGs folder every half second, as
    Cloud Composer syncs its environment bucket's dags/ to its DAG processor."""
    fs = gcs_emulator.filesystem()
    prefix = f"{gcs_emulator.bucket}/composer-dags"
    stop = threading.Event()

    def sync() -> None:
        while not stop.is_set():
            try:
                for path in fs.ls(prefix, detail=False, refresh=True) if fs.exists(prefix) else []:
                    target = journey.server.dags_folder / path.rsplit("/", 1)[-1]
                    data = fs.cat_file(path)
                    if not target.exists() or target.read_bytes() != data:
                        target.write_bytes(data)
            except FileNotFoundError:
                pass
            stop.wait(0.5)

    thread = threading.Thread(target=sync, daemon=True)
    thread.start()
    yield f"gs://{prefix}"
    stop.set()
    thread.join(5)


def test_upload_pipeline_to_a_gs_dags_folder(journey: Journey, gcs_emulator: Any, composer_bucket_sync: str) -> None:
    journey.configure("composer", "journey-uploaded", composer_bucket_sync)
    uploaded = journey.kvx("upload-pipeline", "--env", "composer", "--operator", "local", **gcs_emulator.env)
    assert uploaded.returncode == 0, uploaded.stderr[-3000:]
    assert (f"DAG journey-uploaded created from {composer_bucket_sync}/journey-uploaded.py, parsed by Airflow "
            "(paused: `schedule --resume` starts its schedule)") in uploaded.stdout
    fs = gcs_emulator.filesystem()
    written = fs.cat_file(f"{composer_bucket_sync.removeprefix('gs://')}/journey-uploaded.py")
    assert written.startswith(b'"""Airflow DAG')
    assert api_get(journey, "/api/v2/dags/journey-uploaded")["is_paused"] is True


def test_code_upload_stores_the_archive_under_the_storage_root_and_only_the_dag_file_in_the_dags_folder(
        journey: Journey) -> None:
    journey.configure("code", "journey-code", str(journey.server.dags_folder))
    uploaded = journey.kvx("upload-pipeline", "--env", "code", "--operator", "local", "--code-upload")
    assert uploaded.returncode == 0, uploaded.stderr[-3000:]
    [archive] = (journey.storage / "kvx-code").glob("*.tar.gz")
    text = (journey.server.dags_folder / "journey-code.py").read_text()
    assert f"--code '{archive}#sha256={archive.name.removesuffix('.tar.gz')}'" in text
    assert not [path for path in journey.server.dags_folder.iterdir() if not path.name.endswith(".py")]


def test_bad_inputs_are_one_line_with_the_documented_exit_code(journey: Journey,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    folder = str(journey.server.dags_folder)
    # A wrong password: Airflow refuses the login (exit 2), the password is never printed.
    refused = journey.kvx("list-pipelines", "--env", "local", KVX_AIRFLOW_PASSWORD="not-the-Passw0rd")
    assert refused.returncode == 2 and "Airflow refused the login of 'admin' (HTTP 401)" in last_line(refused)
    assert "not-the-Passw0rd" not in refused.stdout + refused.stderr
    # Nothing listens there: exit 3 after the retries, in one line.
    journey.configure("nowhere", "journey-nowhere", folder, host=f"http://127.0.0.1:{free_port()}")
    unreachable = journey.kvx("list-pipelines", "--env", "nowhere", KVX_API_ATTEMPTS="2")
    assert unreachable.returncode == 3, unreachable.stderr[-2000:]
    assert "Airflow did not answer" in last_line(unreachable) and "Traceback" not in unreachable.stderr
    # A tag longer than Airflow's 100 characters (Airflow would refuse to import the DAG): exit 2
    # at compile, naming it, nothing published.
    journey.configure("refused", "journey-refused", folder, f"  tags: [{'t' * 120}]\n")
    bad_dag = journey.kvx("upload-pipeline", "--env", "refused", "--operator", "local")
    assert bad_dag.returncode == 2, bad_dag.stderr[-2000:]
    assert "run_config.tags: tag 'tttt" in last_line(bad_dag) and "Airflow takes 1 to 100" in last_line(bad_dag)
    assert not (journey.server.dags_folder / "journey-refused.py").exists()
    # A DAG file Airflow cannot import: the wait for its parse ends with Airflow's error, exit 2.
    from kvx_runtime.auth.airflow import AirflowPasswordAuth
    from kvx_runtime.errors import ConfigError
    from kvx_runtime.targets.airflow import AirflowTarget, dag_spec
    from kvx_runtime.targets.base import UploadRequest

    monkeypatch.setenv("KVX_AIRFLOW_PARSE_TIMEOUT", "120")
    target = AirflowTarget(journey.server.url, dags_folder=folder,
                           auth=AirflowPasswordAuth(journey.server.url, journey.server.username,
                                                    journey.server.password))
    with pytest.raises(ConfigError, match="Airflow cannot import the DAG file journey-unimportable.py: .*on purpose"):
        # (Airflow's safe mode parses only files that mention both "airflow" and "dag".)
        target.upload(UploadRequest(spec=dag_spec("journey-unimportable",
                                                  "# an airflow DAG file\nraise ValueError('refused on purpose')\n")))
    (journey.server.dags_folder / "journey-unimportable.py").unlink()
    # An unknown config key (a typo): a warning naming it and the key meant; with --strict, exit 2
    # before anything is published.
    journey.configure("unknown", "journey-unknown", folder, "  dag_idd: typo\n")
    unknown = journey.kvx("upload-pipeline", "--env", "unknown", "--operator", "local", "--strict")
    assert unknown.returncode == 2, unknown.stderr[-2000:]
    assert "unknown key run_config.dag_idd (did you mean run_config.dag_id?)" in last_line(unknown)
    assert not (journey.server.dags_folder / "journey-unknown.py").exists()


def test_run_once_refuses_a_run_whose_inputs_are_not_in_the_storage_root(journey: Journey, gcs_emulator: Any) -> None:
    # The cloud layout: a raw input read from the (Cloud Storage) root, where compiling does not look.
    folder = str(journey.server.dags_folder)
    journey.configure("rawcloud", "journey-rawcloud", folder)
    (journey.project / "conf" / "rawcloud" / "catalog.yml").write_text(
        "companies:\n  type: pandas.CSVDataset\n  filepath: ${storage_root}/data/01_raw/companies.csv\n")
    root = f"gs://{gcs_emulator.bucket}/journey-rawcloud"
    refused = journey.kvx("run-once", "--env", "rawcloud", "--operator", "local", "--no-wait",
                          "--storage-root", root, **gcs_emulator.env)
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert last_line(refused).startswith(
        f"kvx-runtime airflow run-once failed: pipeline input not in the storage root: 'companies' at "
        f"{root}/data/01_raw/companies.csv; the step reading it would fail, so nothing was submitted")
    assert not (journey.server.dags_folder / "journey-rawcloud-run-once.py").exists()
    assert not list(journey.server.dags_folder.glob("journey-rawcloud*"))
