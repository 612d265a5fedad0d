"""Compiled Airflow DAGs against real Airflow 3 (integration/airflow_env.py's virtualenvs): the
DAG files of the example and real-world projects import and serialize (as Airflow's DAG processor
does) with no error, their task graphs are Kedro's dependencies (the KFP spec's, compiled from
the same plan), and each pod is what the config says, built by the provider without a cluster.
The same files under Airflow 2.10 (Cloud Composer 2): no error, the same DAGs, tasks and pods.
Every DAG is parsed once, in one process of each Airflow, for the whole module."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from conftest import REPO
from integration.airflow_env import AIRFLOW2, AirflowEnv, AirflowVenv, find_or_build
from integration.conftest import KVX, step_env
from integration.golden_specs import AIRFLOW_RICH_CONFIG as RICH_CONFIG
from integration.golden_specs import CASES, GOLDEN, find_ruff, ruff_findings
from kvx_runtime.compiler.kfp_reader import build_graph

pytestmark = [pytest.mark.slow, pytest.mark.airflow]

GOLDEN_DAGS = [case.name for case in CASES if case.airflow]
#: The compiled cases whose graph is checked against the KFP spec of the same plan.
GRAPH_CASES = ["example-rich", "example-local", "real-world"]


def _example_config(dag_id: str, run_config: str) -> str:
    """An airflow-k8s.yml of the example project: its DAG ``dag_id`` with ``run_config`` keys."""
    return ("host: https://airflow.example.com\nrun_config:\n"
            "  image: europe-docker.pkg.dev/kvx-example/images/spaceflights:1\n"
            f"  root: gs://kvx-example-bucket/airflow\n  dag_id: {dag_id}\n{run_config}")


#: What the golden DAGs do not write: the GoogleOAuth2 macro and a backoff factor Airflow 2.10
#: cannot say (3: the file tells the two Airflows apart).
GOOGLE_CONFIG = _example_config("spaceflights-google", """\
  authentication: {type: GoogleOAuth2}
  retries:
    __default__: {max_retry_count: 3, backoff_duration: 30s, backoff_factor: 3}
""")
#: What the other cases do not write: a start date with its offset, croniter's own day syntax (the
#: last Friday), an optional secret, a continuous schedule.
EDGES_CONFIG = _example_config("spaceflights-edges", """\
  schedule: "0 3 * * L5"
  start_date: "2026-01-05T00:00:00+01:00"
  kubernetes:
    secrets_as_env:
      - {secret_name: minio-keys, keys: {accesskey: AWS_ACCESS_KEY_ID}, optional: true}
      - {secret_name: mlflow-auth, keys: {token: MLFLOW_TRACKING_TOKEN}}
""")
CONTINUOUS_CONFIG = _example_config("spaceflights-continuous", """\
  schedule: "@continuous"
  start_date: 2026-01-05
""")

#: Airflow 3's and 2.10's homes of DagBag and of the serializer the DAG processor stores DAGs with.
PARSE = r"""
import json, sys
from kubernetes.client import ApiClient
try:
    from airflow.dag_processing.dagbag import DagBag
    from airflow.serialization.serialized_objects import DagSerialization
except ImportError:  # Airflow 2.10
    from airflow.models.dagbag import DagBag
    from airflow.serialization.serialized_objects import SerializedDAG as DagSerialization

out = {}
for path in sys.argv[1:]:
    bag = DagBag(dag_folder=path)
    errors = {key: str(value)[-800:] for key, value in bag.import_errors.items()}
    dags = {}
    for dag_id, dag in bag.dags.items():
        try:
            DagSerialization.to_dict(dag)
        except Exception as exc:
            errors[f"serializing {dag_id}"] = repr(exc)[-800:]
        tasks = {}
        for task in dag.tasks:
            item = {"type": type(task).__name__, "upstream": sorted(task.upstream_task_ids),
                    "trigger_rule": str(getattr(task.trigger_rule, "value", task.trigger_rule)),
                    "retries": task.retries, "retry_exponential_backoff": task.retry_exponential_backoff}
            if item["type"] == "KubernetesPodOperator":
                item["pod"] = ApiClient().sanitize_for_serialization(task.build_pod_request_obj())
            if hasattr(task, "bash_command"):
                item["bash_command"] = task.bash_command
                item["cwd"] = task.cwd
            tasks[task.task_id] = item
        schedule = dag.schedule if hasattr(dag, "schedule") else dag.schedule_interval  # Airflow 2.10
        dags[dag_id] = {"tasks": tasks, "params": {k: dag.params[k] for k in dag.params},
                        "schedule": str(schedule), "tags": sorted(dag.tags), "timezone": str(dag.timezone),
                        "max_active_runs": dag.max_active_runs}
    out[path] = {"errors": errors, "dags": dags}
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
    for env, config in (("google", GOOGLE_CONFIG), ("edges", EDGES_CONFIG), ("continuous", CONTINUOUS_CONFIG)):
        (example / "conf" / env).mkdir()
        (example / "conf" / env / "airflow-k8s.yml").write_text(config)
    real_world = _copy(REPO / "integration" / "real_world_project", root / "real_world")
    cases = {
        "example-rich": (example, ["--env", "airflow"]),
        "example-local": (example, ["--env", "base", "--operator", "local"]),
        "real-world": (real_world, ["--env", "base"]),
        "example-google": (example, ["--env", "google"]),
        "example-edges": (example, ["--env", "edges"]),
        "example-continuous": (example, ["--env", "continuous"]),
    }
    files: dict[str, Any] = {}
    for name, (project, args) in cases.items():
        dag = root / f"{name}.py"
        made = _kvx(project, "airflow", "compile", *args, "-o", str(dag))
        assert made.returncode == 0, made.stderr[-3000:]
        files[name] = {"dag": dag}
        if name not in GRAPH_CASES:
            continue
        env = args[args.index("--env") + 1]
        spec = root / f"{name}.json"
        made = _kvx(project, "kfp", "compile", "--env", env, "-o", str(spec))
        assert made.returncode == 0, made.stderr[-3000:]
        files[name].update(spec=json.loads(spec.read_text()), stdout=made.stdout)
    # The golden DAG files (integration/golden) are parsed in the same Airflow process.
    for golden in GOLDEN_DAGS:
        files[golden] = {"dag": GOLDEN / f"{golden}.py"}
    parsed = airflow.run_json(PARSE, *(str(case["dag"]) for case in files.values()))
    for case in files.values():
        case["parsed"] = parsed[str(case["dag"])]
    return files


@pytest.mark.parametrize("case", GRAPH_CASES)
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


def test_what_airflow_takes_from_a_config_is_what_the_dag_says(compiled: dict[str, Any]) -> None:
    edges = compiled["example-edges"]["parsed"]
    assert edges["errors"] == {}
    dag = edges["dags"]["spaceflights-edges"]
    # The schedule runs at 03:00 where the start date was given (+01:00), not at 03:00 UTC.
    assert dag["schedule"] == "0 3 * * L5" and "+01:00" in dag["timezone"]
    [container] = dag["tasks"]["data-processing-preprocess-companies-node"]["pod"]["spec"]["containers"]
    env = {item["name"]: item for item in container["env"]}
    # An optional secret leaves the variable unset when the secret is missing, as on Kubeflow; the
    # pod does not wait for it until its start-up timeout.
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"] == {
        "secretKeyRef": {"name": "minio-keys", "key": "accesskey", "optional": True}}
    assert env["MLFLOW_TRACKING_TOKEN"]["valueFrom"] == {"secretKeyRef": {"name": "mlflow-auth", "key": "token"}}
    assert env["KVX_ORCHESTRATOR"]["value"] == "airflow"
    continuous = compiled["example-continuous"]["parsed"]
    assert continuous["errors"] == {}  # Airflow refuses @continuous with more than one active run
    assert continuous["dags"]["spaceflights-continuous"]["max_active_runs"] == 1


def test_a_task_named_like_a_builtin_does_not_shadow_what_the_exit_tasks_call(tmp_path: Path) -> None:
    from integration.conftest import make_project

    project = make_project(tmp_path, "builtinproj", "def make():\n    return 1\n",
                           "from kedro.pipeline import Pipeline, node\nfrom builtinproj.nodes import make\n\n"
                           "def register_pipelines():\n    return {'__default__': Pipeline([node(make, None, 'x', "
                           "name='sorted'), node(make, None, 'z', name='kvx_google_audience')]), "
                           "'cleanup': Pipeline([node(make, None, 'y', name='any')])}\n")
    (project / "conf" / "base" / "airflow-k8s.yml").write_text(
        "run_config:\n  image: img\n  root: gs://kvx-bucket/p\n  on_exit_pipeline: cleanup\n"
        "  authentication: {type: GoogleOAuth2}\n")
    made = _kvx(project, "airflow", "compile", "-o", str(tmp_path / "dag.py"))
    assert made.returncode == 0, made.stderr[-2000:]
    text = (tmp_path / "dag.py").read_text()
    assert "kvx_final_status" in text and "def kvx_google_audience" in text
    # No task variable (module-level names, also inside the `with DAG` block) takes their names.
    assert not re.search(r"^\s*(sorted|any|kvx_google_audience) =", text, re.MULTILINE)


def test_each_pipeline_has_a_dag_of_its_own_under_a_configured_dag_id(tmp_path: Path) -> None:
    # run_config.dag_id names the default pipeline's DAG: another pipeline's would replace it.
    project = _copy(REPO / "integration" / "example_project", tmp_path / "example")
    (project / "conf" / "airflow").mkdir()
    (project / "conf" / "airflow" / "airflow-k8s.yml").write_text(RICH_CONFIG)
    ids = {}
    for pipeline in ("__default__", "data_science"):
        made = _kvx(project, "airflow", "compile", "--env", "airflow", "--pipeline", pipeline,
                    "-o", str(tmp_path / f"{pipeline}.py"))
        assert made.returncode == 0, made.stderr[-2000:]
        ids[pipeline] = re.search(r"Airflow DAG (\S+)", made.stdout).group(1)  # type: ignore[union-attr]
    assert ids == {"__default__": "spaceflights-airflow", "data_science": "spaceflights-airflow-data_science"}


def test_a_bad_schedule_override_is_one_line_and_exit_2(tmp_path: Path) -> None:
    project = _copy(REPO / "integration" / "example_project", tmp_path / "example")
    (project / "conf" / "sched").mkdir()
    (project / "conf" / "sched" / "airflow-k8s.yml").write_text(
        f"host: https://airflow.example.com\nrun_config:\n  image: img\n  root: gs://kvx-bucket/p\n"
        f"  dags_folder: {tmp_path / 'dags'}\n")
    made = _kvx(project, "airflow", "schedule", "--env", "sched", "--cron", "0 3 * *", "--start-date", "2026-01-01")
    assert made.returncode == 2 and "Traceback" not in made.stderr
    assert "run_config.schedule: '0 3 * *' is not a cron expression" in made.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "dags").exists()


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


@pytest.fixture(scope="module")
def airflow2_parsed(tmp_path_factory: pytest.TempPathFactory, compiled: dict[str, Any]) -> dict[str, Any]:
    """The same DAG files parsed by Airflow 2.10 (``.venv-airflow2``), in one process."""
    found = find_or_build(tmp_path_factory.mktemp("airflow2-home"), AIRFLOW2)
    if isinstance(found, str):
        pytest.skip(found)
    parsed = found.run_json(PARSE, *(str(case["dag"]) for case in compiled.values()))
    return {name: parsed[str(case["dag"])] for name, case in compiled.items()}


def _as_configured(task: dict[str, Any]) -> dict[str, Any]:
    """A parsed task without what differs by Airflow and provider version, not by the DAG file:
    the random suffixes of a pod's and its secret volumes' names, the Airflow version label, the
    XCom sidecar's image, and ``retry_exponential_backoff`` (Airflow 2.10's is a bool)."""
    task = {key: value for key, value in task.items() if key != "retry_exponential_backoff"}
    if "pod" in task:
        pod = json.loads(re.sub(r"secretvol[0-9a-f-]{36}", "secretvol", json.dumps(task["pod"])))
        del pod["metadata"]["name"], pod["metadata"]["labels"]["airflow_version"]
        for container in pod["spec"]["containers"]:
            if container["name"] == "airflow-xcom-sidecar":
                del container["image"]
        task["pod"] = pod
    return task


def test_airflow_2_10_imports_every_dag_file_with_the_dags_tasks_and_pods_airflow_3_has(
        compiled: dict[str, Any], airflow2_parsed: dict[str, Any]) -> None:
    """One test for every file (the DAG files Composer 2 would run): one Airflow 2.10 process."""
    assert set(airflow2_parsed) == set(compiled) >= {*GRAPH_CASES, *GOLDEN_DAGS, "example-google"}
    for name, case in compiled.items():
        airflow3, airflow2 = case["parsed"], airflow2_parsed[name]
        assert airflow3["errors"] == {} and airflow2["errors"] == {}, name
        assert set(airflow2["dags"]) == set(airflow3["dags"]) != set(), name
        for dag_id, dag3 in airflow3["dags"].items():
            dag2 = airflow2["dags"][dag_id]
            assert {key: dag2[key] for key in ("params", "schedule", "tags")} == \
                {key: dag3[key] for key in ("params", "schedule", "tags")}, name
            assert dag2["tasks"].keys() == dag3["tasks"].keys(), name
            for task_id, task3 in dag3["tasks"].items():
                task2 = dag2["tasks"][task_id]
                assert _as_configured(task2) == _as_configured(task3), f"{name}: {task_id}"
                # Exponential backoff on both, or on neither.
                assert task2["retry_exponential_backoff"] is bool(task3["retry_exponential_backoff"]), task_id


def test_a_backoff_factor_airflow_2_10_cannot_say_is_airflow_3s_and_doubling_on_2_10(
        compiled: dict[str, Any], airflow2_parsed: dict[str, Any]) -> None:
    text = compiled["example-google"]["dag"].read_text()
    assert "retry_exponential_backoff=3.0 if AIRFLOW_3 else True" in text and "mask_secret(token)" in text
    [dag3] = compiled["example-google"]["parsed"]["dags"].values()
    [dag2] = airflow2_parsed["example-google"]["dags"].values()
    task = "data-science-train-model-node"
    assert dag3["tasks"][task]["retry_exponential_backoff"] == 3.0
    assert dag2["tasks"][task]["retry_exponential_backoff"] is True
    assert dag2["tasks"][task]["retries"] == dag3["tasks"][task]["retries"] == 3


def test_the_compiled_files_the_golden_ones_do_not_cover_are_formatted_as_ruff_formats_them(
        compiled: dict[str, Any]) -> None:
    """As integration/test_golden_specs.py checks the golden files: the variants only compiled
    here (GoogleOAuth2's macro, AIRFLOW_3) are written as ruff writes them, imports sorted and used."""
    ruff = find_ruff()
    if ruff is None:
        pytest.skip("ruff is not installed")
    assert ruff_findings(ruff, [str(compiled[name]["dag"]) for name in (*GRAPH_CASES, "example-google")]) is None


def test_an_airflow_venv_uv_cannot_build_is_a_reason_naming_it_and_uvs_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What the Airflow tests skip with when uv cannot build a venv: here no such Airflow in uv's
    cache, offline (a test's HTTP goes nowhere but 127.0.0.1, which uv would retry for seconds)."""
    monkeypatch.setenv("UV_OFFLINE", "1")
    venv = AirflowVenv(name="Airflow 99", path=tmp_path / "venv", requirements=("apache-airflow>=99,<100",),
                       imports=("airflow",), python=AIRFLOW2.python)
    found = find_or_build(tmp_path / "home", venv)
    assert isinstance(found, str) and found.startswith(f"cannot build {venv.path} (Airflow 99) with uv: ")
    assert "error" in found.removeprefix(f"cannot build {venv.path}")


#: Renders one task's templated fields as a run of the DAG would (``conf`` over the params).
RENDER = r"""
import datetime, json, sys, types
try:
    from airflow.dag_processing.dagbag import DagBag
    from airflow.sdk.definitions.param import process_params
except ImportError:  # Airflow 2.10
    from airflow.models.dagbag import DagBag
    from airflow.models.param import process_params

path, task_id, conf = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
bag = DagBag(dag_folder=path)
[dag] = bag.dags.values()
task = dag.get_task(task_id)
ti = types.SimpleNamespace(xcom_pull=lambda **kwargs: "mlflow-run", dag_id=dag.dag_id, run_id="manual__1")
run = types.SimpleNamespace(run_after=datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc),
                            logical_date=None, conf=conf)
task.render_template_fields({"params": process_params(dag, task, conf, suppress_exception=False),
                             "run_id": "manual__1", "dag_run": run, "ti": ti, "dag": dag, "task": task})
print(json.dumps({"errors": {k: str(v) for k, v in bag.import_errors.items()}, "bash_command": task.bash_command,
                  "cwd": task.cwd, "default": dag.params["items"]}))
"""


def test_values_that_look_like_code_or_templates_reach_the_step_as_written(tmp_path: Path,
                                                                            airflow: AirflowEnv) -> None:
    from integration.conftest import make_project

    # A Kedro parameter named like a dict method; a worker path with a backslash escape, triple
    # quotes and Jinja braces; a node whose task name would be the DAG's own outcome task.
    project = make_project(tmp_path, "oddproj", "def make(items):\n    return items\n",
                           "from kedro.pipeline import Pipeline, node\nfrom oddproj.nodes import make\n\n"
                           "def register_pipelines():\n    return {'__default__': Pipeline([node(make, "
                           "'params:items', 'x', name='outcome', namespace='pipeline')]), 'cleanup': Pipeline("
                           "[node(make, 'params:items', 'y', name='tidy')])}\n")
    (project / "conf" / "base" / "parameters.yml").write_text("items: 5\n")
    (project / "conf" / "base" / "airflow-k8s.yml").write_text(
        "run_config:\n  image: img\n  root: gs://kvx-bucket/p\n  on_exit_pipeline: cleanup\n")
    worker = '/srv/odd\\Nproj """ {{ 7 * 7 }}'
    dag = tmp_path / "dag.py"
    made = _kvx(project, "airflow", "compile", "--operator", "local", "--worker-project-path", worker,
                "--params", "items:int", "--param", "items=7", "-o", str(dag))
    assert made.returncode == 0, made.stderr[-2000:]
    parsed = airflow.run_json(PARSE, str(dag))[str(dag)]
    assert parsed["errors"] == {}
    tasks = parsed["dags"]["oddproj"]["tasks"]
    assert {"pipeline-outcome", "pipeline-outcome-2"} <= set(tasks)  # the node's task is not the outcome's
    assert tasks["pipeline-outcome"]["trigger_rule"] == "all_done"

    for conf, expected in (({}, "items:int=7"), ({"items": 9}, "items:int=9")):
        rendered = airflow.run_json(RENDER, str(dag), "pipeline-outcome-2", json.dumps(conf))
        assert rendered["errors"] == {} and rendered["default"] == 7  # the compile's --param: the DAG's default
        assert f"--param {expected} " in rendered["bash_command"] + " "
        assert rendered["cwd"] == worker


def test_fail_fast_that_airflow_does_not_apply_is_said_and_refused_under_strict(tmp_path: Path) -> None:
    project = _copy(REPO / "integration" / "example_project", tmp_path / "example")
    (project / "conf" / "fast").mkdir()
    (project / "conf" / "fast" / "airflow-k8s.yml").write_text(
        "run_config:\n  image: img\n  root: gs://kvx-bucket/p\n  failure_policy: fail_fast\n")
    made = _kvx(project, "airflow", "compile", "--env", "fast", "-o", str(tmp_path / "dag.py"))
    assert made.returncode == 0 and "fail_fast is not applied by the Airflow DAG" in made.stderr
    strict = _kvx(project, "airflow", "compile", "--env", "fast", "--strict", "-o", str(tmp_path / "strict.py"))
    assert strict.returncode == 2 and "fail_fast is not applied" in strict.stderr
    assert not (tmp_path / "strict.py").exists()


def test_pod_settings_the_local_operator_does_not_apply_are_said_and_refused_under_strict(tmp_path: Path) -> None:
    project = _copy(REPO / "integration" / "example_project", tmp_path / "example")
    (project / "conf" / "worker").mkdir()
    (project / "conf" / "worker" / "airflow-k8s.yml").write_text(
        "run_config:\n  image: img\n  root: gs://kvx-bucket/p\n  resources:\n    __default__: {memory: 2Gi}\n"
        "  tolerations: [{key: gpu, operator: Exists, effect: NoSchedule}]\n")
    made = _kvx(project, "airflow", "compile", "--env", "worker", "--operator", "local", "-o", str(tmp_path / "d.py"))
    assert made.returncode == 0, made.stderr[-2000:]
    assert "with --operator local the tasks run on the Airflow worker, not in pods" in made.stderr
    assert "run_config.tolerations" in made.stderr and "run_config.resources" in made.stderr
    strict = _kvx(project, "airflow", "compile", "--env", "worker", "--operator", "local", "--strict",
                  "-o", str(tmp_path / "s.py"))
    assert strict.returncode == 2 and "run_config.tolerations not applied by --operator local" in strict.stderr
    pods = _kvx(project, "airflow", "compile", "--env", "worker", "-o", str(tmp_path / "p.py"))
    assert pods.returncode == 0 and "--operator local" not in pods.stderr, pods.stderr[-2000:]


RENDER_POD = r"""
import datetime, json, sys, types
try:
    from airflow.dag_processing.dagbag import DagBag
    from airflow.sdk.definitions.param import process_params
except ImportError:  # Airflow 2.10
    from airflow.models.dagbag import DagBag
    from airflow.models.param import process_params

path, task_id = sys.argv[1], sys.argv[2]
bag = DagBag(dag_folder=path)
[dag] = bag.dags.values()
task = dag.get_task(task_id)
ti = types.SimpleNamespace(xcom_pull=lambda **kwargs: "mlflow-run", dag_id=dag.dag_id, run_id="manual__1")
run = types.SimpleNamespace(run_after=datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc),
                            logical_date=None, conf={})
task.render_template_fields({"params": process_params(dag, task, {}, suppress_exception=False),
                             "run_id": "manual__1", "dag_run": run, "ti": ti, "dag": dag, "task": task})
print(json.dumps({"errors": {k: str(v) for k, v in bag.import_errors.items()}, "arguments": task.arguments,
                  "node_selector": task.node_selector, "kubernetes_conn_id": task.kubernetes_conn_id}))
"""


def test_dict_params_keep_their_order_and_pod_settings_stay_literal(tmp_path: Path, airflow: AirflowEnv) -> None:
    from integration.conftest import make_project

    project = make_project(tmp_path, "dictproj", "def make(items):\n    return list(items)\n",
                           "from kedro.pipeline import Pipeline, node\nfrom dictproj.nodes import make\n\n"
                           "def register_pipelines():\n    return {'__default__': Pipeline([node(make, "
                           "'params:items', 'x', name='make')])}\n")
    (project / "conf" / "base" / "parameters.yml").write_text("items: {zeta: 1, alpha: 2}\n")
    (project / "conf" / "base" / "airflow-k8s.yml").write_text(
        "run_config:\n  image: img\n  root: gs://kvx-bucket/p\n  kubernetes_conn_id: 'conn_{{ 7 * 7 }}'\n"
        "  node_selectors:\n    make: {pool: 'pool-{{ 6 * 7 }}'}\n")
    pods = tmp_path / "pods.py"
    made = _kvx(project, "airflow", "compile", "--params", "items:dict", "-o", str(pods))
    assert made.returncode == 0, made.stderr[-2000:]
    rendered = airflow.run_json(RENDER_POD, str(pods), "make")
    assert rendered["errors"] == {}
    assert 'items:dict={"zeta": 1, "alpha": 2}' in rendered["arguments"]  # Jinja's tojson sorted the keys
    assert rendered["node_selector"] == {"pool": "pool-{{ 6 * 7 }}"}
    assert rendered["kubernetes_conn_id"] == "conn_{{ 7 * 7 }}"

    local = tmp_path / "local.py"
    made = _kvx(project, "airflow", "compile", "--operator", "local", "--params", "items:dict", "-o", str(local))
    assert made.returncode == 0, made.stderr[-2000:]
    command = airflow.run_json(RENDER, str(local), "make", "{}")["bash_command"]
    assert """'items:dict={"zeta": 1, "alpha": 2}'""" in command
