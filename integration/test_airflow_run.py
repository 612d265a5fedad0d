"""The example project's ``--operator local`` DAG run end to end by real Airflow 3 (``airflow
dags test``: one DAG run in one process, no scheduler, sqlite in a temporary AIRFLOW_HOME), its
tasks running ``kvx-runtime exec-node`` from the Kedro venv, against a real MLflow server.

One DAG run per outcome (each is a minute or two on 2 cores): a successful one compared with a
plain ``kedro run``, and one whose ``split_data`` node raises (a DAG run ``conf`` sets the
test size out of range), which must fail the DAG run and end the MLflow run FAILED.
"""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from conftest import REPO
from integration.airflow_env import LocalAirflow, find_or_build, local_airflow_for
from integration.conftest import KVX, MlflowServer, kedro_in_process, step_env

pytestmark = [pytest.mark.slow, pytest.mark.airflow]

DAG_ID = "spaceflights-kvx"
REPORTS = ["importance.csv", "shuttle_summary.csv"]


@pytest.fixture(scope="module")
def local_airflow(tmp_path_factory: pytest.TempPathFactory, mlflow_server: MlflowServer) -> LocalAirflow:
    root = tmp_path_factory.mktemp("airflow-run")
    found = find_or_build(root / "home")
    if isinstance(found, str):
        pytest.skip(found)
    project = root / "example"
    shutil.copytree(REPO / "integration" / "example_project", project,
                    ignore=shutil.ignore_patterns(".kvx", "__pycache__", "mlruns", "08_reporting"))
    dag_file = root / "dags" / "spaceflights.py"
    # The MLflow set-up of the example project is its laptop env, conf/local. The test size is a
    # DAG param, so that one run's conf can make split_data raise.
    made = subprocess.run([*KVX, "airflow", "compile", "--env", "local", "--operator", "local",
                           "--storage-root", str(root / "storage"),
                           "--params", "data_science.model_options.test_size:float", "-o", str(dag_file)],
                          cwd=project, env=step_env(), capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stderr[-3000:]
    return local_airflow_for(found, project, dag_file, DAG_ID, KEDRO_CONFIG_MLFLOW_TRACKING_URI=mlflow_server.url)


def _mlflow_runs(mlflow_server: MlflowServer, airflow_run_id: str) -> list:
    client = mlflow_server.client()
    experiment = client.get_experiment_by_name("spaceflights-kvx")
    return client.search_runs([experiment.experiment_id], filter_string=f"tags.airflow_run_id = '{airflow_run_id}'")


def test_a_dag_run_makes_what_kedro_run_makes_in_one_finished_mlflow_run(
        local_airflow: LocalAirflow, mlflow_server: MlflowServer) -> None:
    project = local_airflow.project
    run = local_airflow.test_run()
    assert run.state == "success", run.output[-4000:]
    assert set(run.tasks.values()) == {"success"} and len(run.tasks) == 13

    # A plain `kedro run` of the same project (env base: the same files, no MLflow).
    kedro_in_process(project, "run", "base", env=step_env(KEDRO_CONFIG_RUN_ID="baseline"))
    produced = project / "data" / "08_reporting" / run.run_id
    baseline = project / "data" / "08_reporting" / "baseline"
    for name in REPORTS:
        assert (produced / name).read_text() == (baseline / name).read_text(), name
    # The report lists the metrics as the env's metrics dataset loads them: read back from MLflow
    # in conf/local, named after the dataset there.
    report = (produced / "report_dirty.md").read_text()
    assert "- metrics.r2_score: " in report
    assert report.replace("- metrics.", "- ") == (baseline / "report_dirty.md").read_text()

    [mlflow_run] = _mlflow_runs(mlflow_server, run.run_id)  # every task wrote to the one run
    assert mlflow_run.info.status == "FINISHED"
    assert mlflow_run.data.tags["kvx.final_state"] == "SUCCEEDED"
    assert mlflow_run.data.tags["kvx.last_node"] == "reporting.build_report_node"
    assert mlflow_run.data.params["data_science.model_options.test_size"] == "0.2"
    # conf/local sends the metrics to MLflow, written by the evaluate step into the start task's run.
    assert set(mlflow_run.data.metrics) == {"metrics.r2_score", "metrics.mae", "metrics.max_error",
                                            "metrics.test_rows"}
    baseline_metrics = json.loads((baseline / "metrics.json").read_text())
    assert mlflow_run.data.metrics["metrics.r2_score"] == pytest.approx(baseline_metrics["r2_score"]["value"])


def test_a_failing_node_fails_the_dag_run_and_its_mlflow_run(
        local_airflow: LocalAirflow, mlflow_server: MlflowServer) -> None:
    run = local_airflow.test_run({"data_science__model_options__test_size": 7.5})
    assert run.state == "failed", run.output[-4000:]
    assert run.tasks["data-science-split-data-node"] == "failed"
    assert run.tasks["data-science-train-model-node"] == "upstream_failed"
    # The exit task ran whatever happened upstream; the outcome task names the failed task.
    assert run.tasks["mlflow-end-run"] == "success" and run.tasks["pipeline-outcome"] == "failed"
    assert "failed tasks: data-science-split-data-node" in run.output

    [mlflow_run] = _mlflow_runs(mlflow_server, run.run_id)
    assert mlflow_run.info.status == "FAILED"
    assert mlflow_run.data.tags["kvx.failed_node"] == "data_science.split_data_node"
    assert mlflow_run.data.tags["kvx.final_state"] == "FAILED"
    assert mlflow_run.data.tags["kvx.error"] == "failed tasks: data-science-split-data-node"
    assert mlflow_run.data.params["data_science.model_options.test_size"] == "7.5"
