"""The ``airflow_server`` fixture is a working Airflow 3 deployment: its REST API authenticates
with the SimpleAuthManager's token, and a DAG file dropped into its folder is parsed, runs when
triggered (once unpaused) and has its task's log served, all within seconds."""

from __future__ import annotations

import time
from datetime import datetime, timezone

import pytest

from integration.airflow_server import AirflowServer, poll, request

pytestmark = [pytest.mark.slow, pytest.mark.airflow, pytest.mark.xdist_group("airflow-server")]

HELLO_DAG = '''\
from airflow.providers.standard.operators.bash import BashOperator
from airflow.sdk import DAG

with DAG(dag_id="{dag_id}", schedule=None, catchup=False, tags=["kvx-test"]):
    BashOperator(task_id="say_hi", bash_command="echo hi")
'''


def test_the_api_takes_the_admins_token_and_refuses_requests_without_one(airflow_server: AirflowServer) -> None:
    print(f"Airflow deployment up in {airflow_server.startup_seconds:.1f} s at {airflow_server.url}")
    status, version = request(airflow_server.url, "GET", "/api/v2/version")
    assert status == 200 and version["version"].startswith("3."), version

    token = airflow_server.token()
    assert token.count(".") == 2  # a JWT
    status, dags = request(airflow_server.url, "GET", "/api/v2/dags", token=token)
    assert status == 200 and "dags" in dags and "total_entries" in dags, dags

    assert request(airflow_server.url, "GET", "/api/v2/dags") == (401, {"detail": "Not authenticated"})
    status, _ = request(airflow_server.url, "GET", "/api/v2/dags", token="not-a-jwt")
    assert status == 403  # a token that does not verify: 403, not 401
    status, refused = request(airflow_server.url, "POST", "/auth/token",
                              {"username": airflow_server.username, "password": "wrong"})
    assert status == 401, refused


def test_a_dag_file_dropped_in_is_parsed_runs_when_triggered_and_serves_its_log(
        airflow_server: AirflowServer) -> None:
    dag_id = "kvx_server_hello"
    api = airflow_server.api
    (airflow_server.dags_folder / "kvx_server_hello.py").write_text(HELLO_DAG.format(dag_id=dag_id))

    def parsed() -> dict | None:
        status, body = api("GET", f"/api/v2/dags/{dag_id}")
        return body if status == 200 else None

    dag, parse = poll("the DAG parsed", parsed)
    assert dag["is_paused"] is True  # [core] dags_are_paused_at_creation
    assert dag["relative_fileloc"] == "kvx_server_hello.py" and dag["has_import_errors"] is False

    status, unpaused = api("PATCH", f"/api/v2/dags/{dag_id}", {"is_paused": False})
    assert status == 200 and unpaused["is_paused"] is False, unpaused

    triggered_at = time.monotonic()
    status, run = api("POST", f"/api/v2/dags/{dag_id}/dagRuns",
                      {"logical_date": datetime.now(timezone.utc).isoformat(), "conf": {}})
    assert status == 200 and run["state"] == "queued" and run["triggered_by"] == "rest_api", run
    run_id = run["dag_run_id"]

    def finished() -> dict | None:
        status, body = api("GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}")
        assert status == 200, body
        return body if body["state"] in ("success", "failed") else None

    run, _ = poll("the DAG run finished", finished, timeout=120, every=0.5)
    took = time.monotonic() - triggered_at
    assert run["state"] == "success", (run, airflow_server.log_tails())

    status, instances = api("GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances")
    assert status == 200 and instances["total_entries"] == 1, instances
    [task] = instances["task_instances"]
    assert (task["task_id"], task["state"], task["try_number"]) == ("say_hi", "success", 1)

    status, log = api("GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances/say_hi/logs/1")
    assert status == 200, log
    events = [line.get("event") for line in log["content"]]
    assert "hi" in events and "Command exited with return code 0" in events, events
    print(f"parsed {parse:.1f} s after the file was written; triggered to success in {took:.1f} s "
          f"(the task ran {task['duration']:.1f} s)")
