"""The Airflow journey against a real Airflow 2.10 deployment (Cloud Composer 2's line; REST API
v1, HTTP Basic auth: integration/airflow_server.py's AIRFLOW_2): ``kvx-runtime airflow`` asks
the server which API it speaks and drives the same commands as on Airflow 3 (run-once --wait to
success and to failure with the task's log tail and replay command, status, list-pipelines,
schedule with pause and delete), on a three-node project whose ``--operator local`` DAG runs
``kvx-runtime exec-node`` from this checkout."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from integration.conftest import KVX, make_cache_project, step_env

pytestmark = [pytest.mark.slow, pytest.mark.airflow, pytest.mark.xdist_group("airflow2-journey")]


def configure(project: Path, server: Any, env: str, dag_id: str, extra: str = "") -> None:
    folder = project / "conf" / env
    folder.mkdir(exist_ok=True)
    (folder / "airflow-k8s.yml").write_text(
        f"host: {server.url}\nrun_config:\n  image: unused:1\n  root: {project / 'storage'}\n"
        f"  dag_id: {dag_id}\n  dags_folder: {server.dags_folder}\n{extra}")


def kvx(project: Path, server: Any, *args: str) -> subprocess.CompletedProcess[str]:
    env = step_env(KVX_AIRFLOW_USERNAME=server.username, KVX_AIRFLOW_PASSWORD=server.password,
                   KVX_WATCH_INTERVAL="1", KVX_API_RETRY_WAIT="0.2")
    return subprocess.run([*KVX, "airflow", *args], cwd=project, env=env, capture_output=True, text=True,
                          timeout=900)


def last_line(result: subprocess.CompletedProcess[str]) -> str:
    return str(json.loads(result.stderr.strip().splitlines()[-1])["message"])


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory, airflow2_server: Any) -> Path:
    made = make_cache_project(tmp_path_factory.mktemp("journey2"))
    configure(made, airflow2_server, "base", "journey2-kvx")
    return made


def test_run_once_waits_for_a_run_on_airflow_2_10_and_status_and_listing_read_it(
        project: Path, airflow2_server: Any) -> None:
    result = kvx(project, airflow2_server, "run-once", "--operator", "local", "--wait")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "SUCCEEDED" in result.stdout
    [submitted] = [line for line in result.stdout.splitlines() if line.startswith("Submitted ")]
    dag_id, _, run_id = submitted.removeprefix("Submitted ").partition("/")
    assert dag_id == "journey2-kvx"
    # The run's page as printed: a view of the DAG's grid, which Airflow 2.10's UI has (a login
    # redirect for this anonymous request, never a 404).
    from urllib.parse import quote

    import requests

    url = result.stdout.splitlines()[result.stdout.splitlines().index(submitted) + 1].strip()
    assert url == f"{airflow2_server.url}/dags/{dag_id}/grid?dag_run_id={quote(run_id, safe='')}"
    assert requests.get(url, allow_redirects=False, timeout=30).status_code in (200, 302)
    assert (project / "data" / "table.csv").read_text() == "label,total\nTotal,12\n"
    assert airflow2_server.password not in result.stdout + result.stderr

    status = kvx(project, airflow2_server, "status", run_id)
    assert status.returncode == 0, status.stderr[-2000:]
    assert status.stdout.startswith(f"{run_id}: SUCCEEDED") and "SUCCEEDED  tabulate" in status.stdout
    listed = kvx(project, airflow2_server, "list-pipelines")
    assert listed.returncode == 0 and run_id in listed.stdout, listed.stderr[-2000:]


def test_a_failing_step_fails_run_once_with_its_log_tail_and_replay_command_and_resume_finishes_it(
        project: Path, airflow2_server: Any) -> None:
    configure(project, airflow2_server, "broken", "journey2-broken")
    (project / "conf" / "broken" / "catalog.yml").write_text(
        "raw_numbers:\n  type: json.JSONDataset\n  filepath: data/missing.json\n")
    result = kvx(project, airflow2_server, "run-once", "--env", "broken", "--operator", "local", "--wait")
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert "FAILED" in out and "clean" in out
    # The task's log tail, read through API v1 (the text of a list of (host, log) pairs).
    assert "missing.json" in out, out[-3000:]
    assert "kvx-runtime exec-node --node clean --env broken --run-id " in out, out[-3000:]

    # The data fixed, resume runs the failed tasks again within the same DAG run (API v1's clear).
    [submitted] = [line for line in out.splitlines() if line.startswith("Submitted ")]
    (project / "data" / "missing.json").write_text("[1, 2, 3]")
    (project / "data" / "table.csv").unlink(missing_ok=True)  # made again by the resumed run
    resumed = kvx(project, airflow2_server, "resume", "--env", "broken", submitted.removeprefix("Submitted "),
                  "--wait")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "in place: " in resumed.stdout and "SUCCEEDED" in resumed.stdout
    assert (project / "data" / "table.csv").read_text() == "label,total\nTotal,12\n"


def test_schedule_pause_and_delete_on_airflow_2_10(project: Path, airflow2_server: Any) -> None:
    configure(project, airflow2_server, "sched", "journey2-scheduled",
              "  schedule: '0 3 * * *'\n  start_date: 2030-01-01\n")
    created = kvx(project, airflow2_server, "schedule", "--env", "sched", "--operator", "local")
    assert created.returncode == 0, created.stderr[-3000:]
    assert "Schedule journey2-scheduled created: " in created.stdout and "0 3 * * *" in created.stdout
    paused = kvx(project, airflow2_server, "schedule", "--env", "sched", "--pause")
    assert paused.returncode == 0 and "Schedule journey2-scheduled: PAUSED" in paused.stdout, paused.stderr[-2000:]
    status, details = airflow2_server.api("GET", "/api/v1/dags/journey2-scheduled")
    assert status == 200 and details["is_paused"] is True
    deleted = kvx(project, airflow2_server, "schedule", "--env", "sched", "--delete")
    assert deleted.returncode == 0 and "Schedule journey2-scheduled: deleted" in deleted.stdout, \
        deleted.stderr[-2000:]
    assert not (airflow2_server.dags_folder / "journey2-scheduled.py").exists()
    gone = kvx(project, airflow2_server, "schedule", "--env", "sched", "--pause")
    assert gone.returncode == 2 and "Airflow has no scheduled DAG journey2-scheduled" in last_line(gone)
