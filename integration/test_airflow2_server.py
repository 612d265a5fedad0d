"""The ``airflow2_server`` fixture is a working Airflow 2.10 deployment (Cloud Composer 2's
line): its REST API v1 takes the admin's HTTP Basic auth and refuses a wrong password, and a DAG
file dropped into its folder is parsed, runs when triggered (once unpaused) and has its task's
log served as text, all within seconds."""

from __future__ import annotations

import pytest

from integration.airflow_server import AirflowServer, request

pytestmark = [pytest.mark.slow, pytest.mark.airflow, pytest.mark.xdist_group("airflow2-server")]

HELLO_DAG = '''\
from airflow.models.dag import DAG
from airflow.operators.bash import BashOperator

with DAG(dag_id="{dag_id}", schedule=None, catchup=False, tags=["kvx-test"]):
    BashOperator(task_id="say_hi", bash_command="echo hi from $KVX_LOG_FORMAT")
'''


def test_the_api_is_2_10s_v1_and_takes_basic_auth_but_not_a_wrong_password(airflow2_server: AirflowServer) -> None:
    print(f"Airflow 2.10 deployment up in {airflow2_server.startup_seconds:.1f} s at {airflow2_server.url}")
    assert airflow2_server.api_root == "/api/v1"
    status, version = airflow2_server.api("GET", "/api/v1/version")
    assert status == 200 and version["version"].startswith("2.10."), version

    status, dags = airflow2_server.api("GET", "/api/v1/dags")
    assert status == 200 and "dags" in dags and "total_entries" in dags, dags
    status, health = request(airflow2_server.url, "GET", "/health")
    assert status == 200 and health["scheduler"]["status"] == "healthy", health

    basic = (airflow2_server.username, "wrong")
    status, refused = request(airflow2_server.url, "GET", "/api/v1/dags", basic=basic)
    assert status == 401 and refused["title"] == "Unauthorized", refused
    status, refused = request(airflow2_server.url, "GET", "/api/v1/dags")
    assert status == 401, refused
    with pytest.raises(RuntimeError, match="HTTP Basic auth, not a token"):
        airflow2_server.token()


def test_a_dag_file_dropped_in_is_parsed_runs_when_triggered_and_serves_its_log_as_text(
        airflow2_server: AirflowServer) -> None:
    dag_id = "kvx_server2_hello"
    (airflow2_server.dags_folder / "kvx_server2_hello.py").write_text(HELLO_DAG.format(dag_id=dag_id))

    dag = airflow2_server.wait_for_dag(dag_id)
    assert dag["is_paused"] is True  # [core] dags_are_paused_at_creation
    assert dag["fileloc"] == str(airflow2_server.dags_folder / "kvx_server2_hello.py")
    assert dag["has_import_errors"] is False

    run = airflow2_server.run_dag(dag_id)
    assert run.state == "success", (run, airflow2_server.log_tails())
    assert run.tasks == {"say_hi": "success"}
    status, instances = airflow2_server.api("GET", f"/api/v1/dags/{dag_id}/dagRuns/{run.run_id}/taskInstances")
    assert status == 200 and instances["task_instances"][0]["try_number"] == 1, instances

    log = airflow2_server.task_log(dag_id, run.run_id, "say_hi")
    # The task ran on this machine with the deployment's environment (the one tasks get).
    assert "hi from json" in log and "Command exited with return code 0" in log, log
    assert not log.lstrip().startswith("{")  # text, not v1's JSON {"content": ...}
