"""Compiled Airflow DAGs against real Airflow 3 (integration/airflow_env.py's virtualenv): the
DAG files of the example and real-world projects import with no DagBag error, their task graphs
are Kedro's dependencies (the KFP spec's, compiled from the same plan), and each pod is what the
config says, built by the provider without a cluster. Every DAG is parsed once, in one Airflow
process, for the whole module."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from conftest import REPO
from integration.airflow_env import AirflowEnv, find_or_build
from integration.conftest import KVX, step_env
from integration.golden_specs import AIRFLOW_RICH_CONFIG as RICH_CONFIG
from integration.golden_specs import CASES, GOLDEN
from kvx_runtime.compiler.kfp_reader import build_graph

pytestmark = [pytest.mark.slow, pytest.mark.airflow]

GOLDEN_DAGS = [case.name for case in CASES if case.airflow]

PARSE = r"""
import json, sys
from airflow.dag_processing.dagbag import DagBag
from kubernetes.client import ApiClient

out = {}
for path in sys.argv[1:]:
    bag = DagBag(dag_folder=path)
    dags = {}
    for dag_id, dag in bag.dags.items():
        tasks = {}
        for task in dag.tasks:
            item = {"type": type(task).__name__, "upstream": sorted(task.upstream_task_ids),
                    "trigger_rule": str(getattr(task.trigger_rule, "value", task.trigger_rule)),
                    "retries": task.retries}
            if item["type"] == "KubernetesPodOperator":
                item["pod"] = ApiClient().sanitize_for_serialization(task.build_pod_request_obj())
            if hasattr(task, "bash_command"):
                item["bash_command"] = task.bash_command
                item["cwd"] = task.cwd
            tasks[task.task_id] = item
        dags[dag_id] = {"tasks": tasks, "params": {k: dag.params[k] for k in dag.params},
                        "schedule": str(getattr(dag, "schedule", None)), "tags": sorted(dag.tags)}
    out[path] = {"errors": {key: str(value)[-800:] for key, value in bag.import_errors.items()}, "dags": dags}
print(json.dumps(out, default=str))
"""


@pytest.fixture(scope="module")
def airflow(tmp_path_factory: pytest.TempPathFactory) -> AirflowEnv:
    found = find_or_build(tmp_path_factory.mktemp("airflow-home"))
    if isinstance(found, str):
        pytest.skip(found)
    return found


def _copy(source: Path, target: Path) -> Path:
    shutil.copytree(source, target, ignore=shutil.ignore_patterns(".kvx", "__pycache__", "mlruns", "mlflow.db",
                                                                 "08_reporting"))
    return target


def _kvx(project: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*KVX, *args], cwd=project, env=step_env(KEDRO_CONFIG_COMMIT_ID="0123abc"),
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory, airflow: AirflowEnv) -> dict[str, Any]:
    """The DAG files (and KFP specs of the same plans) of every case, parsed by Airflow once."""
    root = tmp_path_factory.mktemp("dags")
    example = _copy(REPO / "integration" / "example_project", root / "example")
    (example / "conf" / "airflow").mkdir()
    (example / "conf" / "airflow" / "airflow-k8s.yml").write_text(RICH_CONFIG)
    real_world = _copy(REPO / "integration" / "real_world_project", root / "real_world")
    cases = {
        "example-rich": (example, ["--env", "airflow"]),
        "example-local": (example, ["--env", "base", "--operator", "local"]),
        "real-world": (real_world, ["--env", "base"]),
    }
    files: dict[str, Any] = {}
    for name, (project, args) in cases.items():
        dag = root / f"{name}.py"
        made = _kvx(project, "airflow", "compile", *args, "-o", str(dag))
        assert made.returncode == 0, made.stderr[-3000:]
        env = args[args.index("--env") + 1]
        spec = root / f"{name}.json"
        made = _kvx(project, "kfp", "compile", "--env", env, "-o", str(spec))
        assert made.returncode == 0, made.stderr[-3000:]
        files[name] = {"dag": dag, "spec": json.loads(spec.read_text()), "stdout": made.stdout}
    # The golden DAG files (integration/golden) are parsed in the same Airflow process.
    for golden in GOLDEN_DAGS:
        files[golden] = {"dag": GOLDEN / f"{golden}.py"}
    parsed = airflow.run_json(PARSE, *(str(case["dag"]) for case in files.values()))
    for case in files.values():
        case["parsed"] = parsed[str(case["dag"])]
    return files


@pytest.mark.parametrize("case", ["example-rich", "example-local", "real-world"])
def test_the_dag_imports_and_its_graph_is_kedros(compiled: dict[str, Any], case: str) -> None:
    parsed = compiled[case]["parsed"]
    assert parsed["errors"] == {}
    [dag] = parsed["dags"].values()
    kfp = build_graph(compiled[case]["spec"], {}).tasks
    tasks = dag["tasks"]
    # One task per step of the plan, plus the run's outcome when there are exit steps.
    assert set(tasks) - {"pipeline-outcome"} == set(kfp)
    for name, task in kfp.items():
        assert set(tasks[name]["upstream"]) == set(task.depends_on), name
    exit_tasks = [name for name, task in tasks.items() if task["trigger_rule"] == "all_done"]
    if "pipeline-outcome" in tasks:
        body = set(tasks) - set(exit_tasks)
        assert set(tasks["pipeline-outcome"]["upstream"]) == body and "pipeline-outcome" in exit_tasks


def test_each_pod_has_the_image_argv_resources_selectors_tolerations_secrets_and_account_of_the_config(
        compiled: dict[str, Any]) -> None:
    dag = compiled["example-rich"]["parsed"]["dags"]["spaceflights-airflow"]
    assert dag["schedule"] == "30 2 * * mon-fri" and "golden" in dag["tags"]
    assert dag["params"]["kvx_storage_root"] == "gs://kvx-example-bucket/airflow"
    train = dag["tasks"]["data-science-train-model-node"]
    assert train["type"] == "KubernetesPodOperator" and train["retries"] == 2
    pod = train["pod"]
    spec, [container] = pod["spec"], pod["spec"]["containers"]
    assert container["image"] == "europe-docker.pkg.dev/kvx-example/images/spaceflights:0123abc"
    assert container["imagePullPolicy"] == "Always"
    assert container["command"] == ["kvx-runtime"]
    args = container["args"]
    assert args[:5] == ["exec-node", "--node", "data_science.train_model_node", "--env", "airflow"]
    assert args[args.index("--run-id") + 1] == "{{ run_id }}"
    assert args[args.index("--job-name") + 1] == "spaceflights-airflow"
    assert args[args.index("--job-create-time") + 1] == \
        "{{ (dag_run.run_after | default(dag_run.logical_date)).isoformat() }}"
    assert container["resources"] == {"limits": {"cpu": "2", "memory": "8Gi", "nvidia.com/gpu": "1"},
                                      "requests": {"cpu": "2", "memory": "8Gi", "nvidia.com/gpu": "1"}}
    assert spec["nodeSelector"] == {"cloud.google.com/gke-nodepool": "kedro-pool",
                                    "cloud.google.com/gke-accelerator": "nvidia-l4"}
    assert spec["tolerations"] == [{"key": "dedicated", "operator": "Equal", "value": "kedro",
                                    "effect": "NoSchedule"}]
    assert spec["serviceAccountName"] == "kedro-runner" and pod["metadata"]["namespace"] == "kedro-steps"
    assert pod["metadata"]["labels"]["team"] == "golden"
    assert pod["metadata"]["annotations"] == {"cluster-autoscaler.kubernetes.io/safe-to-evict": "false"}
    env = {item["name"]: item for item in container["env"]}
    assert env["KVX_ORCHESTRATOR"]["value"] == "airflow" and env["EXTRA"]["value"] == "1"
    assert env["KEDRO_CONFIG_COMMIT_ID"]["value"] == "0123abc"
    assert env["MLFLOW_TRACKING_TOKEN"]["valueFrom"] == {"secretKeyRef": {"name": "mlflow-auth", "key": "token"}}
    [volume] = [v for v in spec["volumes"] if v.get("secret")]
    assert volume["secret"]["secretName"] == "gcp-key"
    assert {"mountPath": "/var/secrets/google", "name": volume["name"], "readOnly": True} in container["volumeMounts"]
    # A step without its own settings gets the defaults.
    other = dag["tasks"]["data-processing-preprocess-companies-node"]["pod"]["spec"]
    assert other["containers"][0]["resources"]["requests"] == {"cpu": "500m", "memory": "1Gi"}
    assert other["nodeSelector"] == {"cloud.google.com/gke-nodepool": "kedro-pool"}


@pytest.mark.parametrize("golden", GOLDEN_DAGS)
def test_the_golden_dag_files_import_with_the_graph_they_were_written_with(compiled: dict[str, Any],
                                                                           golden: str) -> None:
    parsed = compiled[golden]["parsed"]
    assert parsed["errors"] == {}
    [dag] = parsed["dags"].values()
    upstream = json.loads((GOLDEN / f"{golden}.compiled.json").read_text())["upstream"]
    assert {task: sorted(item["upstream"]) for task, item in dag["tasks"].items()} == \
        {task: sorted(after) for task, after in upstream.items()}


def test_no_secret_value_is_in_a_dag_file(compiled: dict[str, Any]) -> None:
    text = compiled["example-rich"]["dag"].read_text()
    assert 'Secret(deploy_type="env", deploy_target="MLFLOW_TRACKING_TOKEN", secret="mlflow-auth", key="token")' \
        in text
    assert "kvx_runtime" not in text.replace("kvx-runtime", "")  # self-contained: nothing of ours imported


def test_the_local_dag_runs_exec_node_from_the_project_directory_with_every_value_quoted(
        compiled: dict[str, Any]) -> None:
    tasks = compiled["example-local"]["parsed"]["dags"]["spaceflights-kvx"]["tasks"]
    task = tasks["data-processing-preprocess-companies-node"]
    assert task["type"] == "BashOperator" and task["cwd"] == str(compiled["example-local"]["dag"].parent / "example")
    assert task["bash_command"].startswith(
        "kvx-runtime exec-node --node data_processing.preprocess_companies_node --env base "
        "--run-id {{ (run_id) | shell_quote }} --job-name spaceflights-kvx ")


@pytest.mark.parametrize(("config", "says"), [
    ("run_config:\n  image: img\n  root: gs://kvx-bucket/p\n  schedule: '0 3 * *'\n",
     "run_config.schedule: '0 3 * *' is not a cron expression: 4 fields, not 5"),
    ("run_config:\n  image: img\n  root: gs://kvx-bucket/p\n  schedule: '@daily'\n",
     "run_config.schedule '@daily' needs run_config.start_date"),
])
def test_a_bad_schedule_is_one_line_and_exit_2(tmp_path: Path, config: str, says: str) -> None:
    project = _copy(REPO / "integration" / "example_project", tmp_path / "example")
    (project / "conf" / "bad").mkdir()
    (project / "conf" / "bad" / "airflow-k8s.yml").write_text(config)
    made = _kvx(project, "airflow", "compile", "--env", "bad", "-o", str(tmp_path / "dag.py"))
    assert made.returncode == 2 and "Traceback" not in made.stderr
    assert says in made.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "dag.py").exists()
