"""The example project's ``--operator local`` DAG run end to end by real Airflow, its tasks
running ``kvx-runtime exec-node`` from the Kedro venv, against a real MLflow server: by Airflow 3
(``airflow dags test``: one DAG run in one process, no scheduler, sqlite in a temporary
AIRFLOW_HOME) and by Airflow 2.10 (the ``airflow2_server`` deployment: the file dropped into its
DAG folder, triggered through REST API v1 and run by its scheduler), the same file for both.

One DAG run per outcome and Airflow (each is a minute or two on 2 cores): a successful one
compared with a plain ``kedro run``, and one whose ``split_data`` node raises (a DAG run ``conf``
sets the test size out of range), which must fail the DAG run and end the MLflow run FAILED.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import REPO
from integration.airflow_env import DagRun, LocalAirflow, find_or_build, local_airflow_for
from integration.airflow_server import AirflowServer
from integration.conftest import KVX, MlflowServer, kedro_in_process, step_env

pytestmark = [pytest.mark.slow, pytest.mark.airflow]

DAG_ID = "spaceflights-kvx"
REPORTS = ["importance.csv", "shuttle_summary.csv"]


@dataclass(frozen=True)
class CompiledDag:
    project: Path
    dag_file: Path


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> CompiledDag:
    """The example project's ``--operator local`` DAG file, compiled once for both Airflows."""
    root = tmp_path_factory.mktemp("airflow-run")
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
    return CompiledDag(project=project, dag_file=dag_file)


@pytest.fixture(scope="module")
def local_airflow(tmp_path_factory: pytest.TempPathFactory, compiled: CompiledDag,
                  mlflow_server: MlflowServer) -> LocalAirflow:
    found = find_or_build(tmp_path_factory.mktemp("airflow-run-home"))
    if isinstance(found, str):
        pytest.skip(found)
    return local_airflow_for(found, compiled.project, compiled.dag_file, DAG_ID,
                             KEDRO_CONFIG_MLFLOW_TRACKING_URI=mlflow_server.url)


@pytest.fixture(scope="module")
def airflow2(compiled: CompiledDag, airflow2_server: AirflowServer) -> AirflowServer:
    """The Airflow 2.10 deployment with the DAG file in its folder, parsed (its tasks log to the
    session's MLflow server, as ``local_airflow``'s)."""
    shutil.copy(compiled.dag_file, airflow2_server.dags_folder / compiled.dag_file.name)
    dag = airflow2_server.wait_for_dag(DAG_ID)
    assert dag["has_import_errors"] is False
    return airflow2_server


def _mlflow_runs(mlflow_server: MlflowServer, airflow_run_id: str) -> list:
    client = mlflow_server.client()
    experiment = client.get_experiment_by_name("spaceflights-kvx")
    return client.search_runs([experiment.experiment_id], filter_string=f"tags.airflow_run_id = '{airflow_run_id}'")


def _assert_it_made_what_kedro_run_makes_in_one_finished_mlflow_run(
        project: Path, run: DagRun, mlflow_server: MlflowServer) -> None:
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
    reported = {name for name in mlflow_run.data.metrics if not name.startswith("kvx.node_seconds.")}
    assert reported == {"metrics.r2_score", "metrics.mae", "metrics.max_error", "metrics.test_rows"}
    assert len(mlflow_run.data.metrics) - len(reported) == 10  # each node's seconds, for the auto grouper
    baseline_metrics = json.loads((baseline / "metrics.json").read_text())
    assert mlflow_run.data.metrics["metrics.r2_score"] == pytest.approx(baseline_metrics["r2_score"]["value"])


#: A DAG run's conf that makes the split_data node raise (a test size out of range).
FAILING_CONF = {"data_science__model_options__test_size": 7.5}


def _assert_it_failed_at_split_data_as_did_its_mlflow_run(run: DagRun, mlflow_server: MlflowServer) -> None:
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


def test_a_dag_run_makes_what_kedro_run_makes_in_one_finished_mlflow_run(
        local_airflow: LocalAirflow, mlflow_server: MlflowServer) -> None:
    _assert_it_made_what_kedro_run_makes_in_one_finished_mlflow_run(
        local_airflow.project, local_airflow.test_run(), mlflow_server)


def test_a_failing_node_fails_the_dag_run_and_its_mlflow_run(
        local_airflow: LocalAirflow, mlflow_server: MlflowServer) -> None:
    _assert_it_failed_at_split_data_as_did_its_mlflow_run(local_airflow.test_run(FAILING_CONF), mlflow_server)


@pytest.mark.xdist_group("airflow2-run")
def test_airflow_2_10_runs_the_dag_to_what_kedro_run_makes_in_one_finished_mlflow_run(
        compiled: CompiledDag, airflow2: AirflowServer, mlflow_server: MlflowServer) -> None:
    _assert_it_made_what_kedro_run_makes_in_one_finished_mlflow_run(
        compiled.project, airflow2.run_dag(DAG_ID), mlflow_server)


@pytest.mark.xdist_group("airflow2-run")
def test_airflow_2_10_fails_the_dag_run_and_its_mlflow_run_when_a_node_fails(
        airflow2: AirflowServer, mlflow_server: MlflowServer) -> None:
    """The outcome task's Airflow 2.10 branch: the body's states read from Airflow's database."""
    _assert_it_failed_at_split_data_as_did_its_mlflow_run(airflow2.run_dag(DAG_ID, FAILING_CONF), mlflow_server)
