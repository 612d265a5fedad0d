"""``run_config.authentication`` of airflow-k8s.yml (kedro-airflow-k8s's section), end to end with
real Airflow 3 (``airflow dags test``) and a real MLflow server that demands credentials:

- ``Vars``: MLflow's basic auth from Airflow Variables (here served from ``AIRFLOW_VAR_*``, as a
  secrets backend would), handed to each task under the same names;
- ``GoogleOAuth2``: a Google ID token for the worker's ``GOOGLE_AUDIENCE``, minted per task from
  the worker's Google credentials (a fake GCE metadata server on 127.0.0.1), in front of MLflow a
  proxy that accepts only valid ID tokens for that audience.

The DAG file holds templates, never a value; no credential shows in Airflow's output.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from integration.airflow_env import LocalAirflow, find_or_build, local_airflow_for
from integration.conftest import ADMIN_PASSWORD, ADMIN_USER, AUDIENCE, KVX, MlflowServer, step_env
from integration.test_mlflow import ml_project

pytestmark = [pytest.mark.slow, pytest.mark.airflow]

DAG_ID = "mlproj-auth"


def airflow_project(tmp_path: Path, authentication: dict[str, Any]) -> tuple[Path, Path]:
    """The small MLflow project with an airflow-k8s.yml (authentication set) instead of
    vertexai.yml; compiled into an ``--operator local`` DAG."""
    project = ml_project(tmp_path)
    config = yaml.safe_load((project / "conf" / "base" / "vertexai.yml").read_text())
    (project / "conf" / "base" / "vertexai.yml").unlink()
    config["run_config"].update(dag_id=DAG_ID, authentication=authentication)
    (project / "conf" / "base" / "airflow-k8s.yml").write_text(yaml.safe_dump(config))
    dag_file = tmp_path / "dags" / f"{DAG_ID}.py"
    made = subprocess.run([*KVX, "airflow", "compile", "--operator", "local", "-o", str(dag_file)], cwd=project,
                          env=step_env(), capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stderr[-3000:]
    return project, dag_file


def run_dag(tmp_path: Path, project: Path, dag_file: Path, **worker_env: str) -> tuple[LocalAirflow, Any]:
    found = find_or_build(tmp_path / "airflow-home")
    if isinstance(found, str):
        pytest.skip(found)
    local = local_airflow_for(found, project, dag_file, DAG_ID, **worker_env)
    # Only the DAG's authentication may give the tasks credentials (Google's: the metadata server).
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN",
                 "GOOGLE_APPLICATION_CREDENTIALS"):
        local.env.pop(name, None)
    return local, local.test_run()


def test_vars_pass_airflow_variables_to_every_task_as_mlflow_credentials(
        tmp_path: Path, mlflow_auth_server: MlflowServer) -> None:
    project, dag_file = airflow_project(tmp_path, {"type": "Vars",
                                                   "params": ["MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"]})
    text = dag_file.read_text()
    assert '"MLFLOW_TRACKING_PASSWORD": "{{ var.value.MLFLOW_TRACKING_PASSWORD }}"' in text
    assert ADMIN_PASSWORD not in text

    _, run = run_dag(tmp_path, project, dag_file, KEDRO_CONFIG_MLFLOW_TRACKING_URI=mlflow_auth_server.url,
                     AIRFLOW_VAR_MLFLOW_TRACKING_USERNAME=ADMIN_USER,
                     AIRFLOW_VAR_MLFLOW_TRACKING_PASSWORD=ADMIN_PASSWORD)
    assert run.state == "success", run.output[-4000:]
    assert ADMIN_PASSWORD not in run.output  # Airflow masks a Variable whose name says password
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_USERNAME", ADMIN_USER)
        patch.setenv("MLFLOW_TRACKING_PASSWORD", ADMIN_PASSWORD)
        client = mlflow_auth_server.client()
        experiment = client.get_experiment_by_name("mlproj")
        [mlflow_run] = client.search_runs([experiment.experiment_id],
                                          filter_string=f"tags.airflow_run_id = '{run.run_id}'")
    assert mlflow_run.info.status == "FINISHED" and "score" in mlflow_run.data.metrics


def test_google_oauth2_gives_every_task_an_id_token_for_the_audience(
        tmp_path: Path, mlflow_server: MlflowServer, fake_google: Any, bearer_proxy: Any) -> None:
    project, dag_file = airflow_project(tmp_path, {"type": "GoogleOAuth2"})
    text = dag_file.read_text()
    assert '"MLFLOW_TRACKING_TOKEN": "{{ kvx_google_id_token() }}"' in text and "def kvx_google_id_token" in text
    # ...and its audience, so that a step outliving the token renews it (integration/test_mlflow.py)
    assert '"KVX_MLFLOW_TOKEN_AUDIENCE": "{{ kvx_google_audience() }}"' in text
    rejected_before, seen_before = len(bearer_proxy.rejected), set(bearer_proxy.tokens_seen)
    host = fake_google.url.removeprefix("http://")
    _, run = run_dag(tmp_path, project, dag_file, KEDRO_CONFIG_MLFLOW_TRACKING_URI=bearer_proxy.url,
                         GOOGLE_AUDIENCE=AUDIENCE, GCE_METADATA_HOST=host, GCE_METADATA_IP=host,
                         NO_GCE_CHECK="False", CLOUDSDK_CONFIG=str(tmp_path / "no-gcloud"))
    assert run.state == "success", run.output[-4000:]
    assert len(bearer_proxy.rejected) == rejected_before  # every MLflow request carried a valid token
    new_tokens = bearer_proxy.tokens_seen - seen_before
    assert new_tokens and new_tokens <= set(fake_google.issued)
    assert not any(token in run.output for token in new_tokens)
    experiment = mlflow_server.client().get_experiment_by_name("mlproj")
    [mlflow_run] = mlflow_server.client().search_runs([experiment.experiment_id],
                                                      filter_string=f"tags.airflow_run_id = '{run.run_id}'")
    assert mlflow_run.info.status == "FINISHED"
