"""The compiler on real projects (spec validated with kfp-pipeline-spec, a test-only
dependency) and run-local of the compiled spec end to end."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from google.protobuf import json_format

from integration.conftest import KVX, make_project, reports, step_env

pytestmark = pytest.mark.slow


def validate(spec: dict) -> None:
    """What Vertex AI's API would reject: unknown fields, bad enums, bad executors."""
    from kfp.pipeline_spec import pipeline_spec_pb2

    json_format.ParseDict(spec, pipeline_spec_pb2.PipelineSpec())
    for executor in spec["deploymentSpec"]["executors"].values():
        json_format.ParseDict(executor, pipeline_spec_pb2.PipelineDeploymentConfig.ExecutorSpec())


def kvx(project: Path, *args: str, env=None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*KVX, *args], cwd=project, env=env or step_env(), capture_output=True,
                          text=True, timeout=timeout)


def compile_spec(project: Path, out: Path, *args: str) -> dict:
    result = kvx(project, "compile", "--output", str(out), *args)
    assert result.returncode == 0, result.stderr[-3000:]
    spec = yaml.safe_load(out.read_text()) if out.suffix == ".yaml" else json.loads(out.read_text())
    validate(spec)
    return spec


def executor_args(spec: dict, task: str) -> list[str]:
    return spec["deploymentSpec"]["executors"][f"exec-{task}"]["container"]["args"]


@pytest.mark.kedro
def test_example_project_compiles_to_a_valid_spec(example_project: Path, tmp_path: Path) -> None:
    spec = compile_spec(example_project, tmp_path / "p.json", "--env", "cloud",
                        "--params", "data_science.model_options.test_size:float",
                        "--params", "data_science.model_options.features:list,reporting.title:str")
    tasks = spec["root"]["dag"]["tasks"]
    assert len(tasks) == 10 and "mlflow-start-run" not in tasks
    assert tasks["data-science-train-model-node"]["dependentTasks"] == [
        "data-science-fit-scaler-node", "data-science-split-data-node"]
    assert tasks["data-science-evaluate-model-node"]["dependentTasks"] == [
        "data-science-fit-scaler-node", "data-science-split-data-node", "data-science-train-model-node"]
    args = executor_args(spec, "data-science-train-model-node")
    assert args[:2] == ["--node", "data_science.train_model_node"]
    assert args[args.index("--run-id") + 1] == "{{$.inputs.parameters['kvx_job_uuid']}}"
    assert args[args.index("--job-name") + 1] == "{{$.inputs.parameters['kvx_job_name']}}"
    task_inputs = tasks["data-science-train-model-node"]["inputs"]["parameters"]
    assert task_inputs["kvx_job_uuid"] == {"runtimeValue": {"constant": "{{$.pipeline_job_uuid}}"}}
    assert task_inputs["kvx_job_name"] == {"runtimeValue": {"constant": "{{$.pipeline_job_name}}"}}
    placeholder = "{{$.inputs.parameters['data_science__model_options__test_size']}}"
    assert f"data_science.model_options.test_size:float={placeholder}" in args
    inputs = spec["root"]["inputDefinitions"]["parameters"]
    assert inputs["data_science__model_options__test_size"] == {
        "defaultValue": 0.2, "isOptional": True, "parameterType": "NUMBER_DOUBLE"}
    assert inputs["data_science__model_options__features"]["parameterType"] == "LIST"
    assert inputs["kvx_storage_root"]["defaultValue"] == "gs://kvx-example-bucket/pipelines"
    container = spec["deploymentSpec"]["executors"]["exec-data-science-train-model-node"]["container"]
    assert container["command"] == ["kvx-runtime", "exec-node"]
    assert container["resources"]["resourceMemoryLimit"] == "4Gi"
    assert container["image"].endswith("spaceflights-kvx:latest")
    assert all(task["cachingOptions"] == {} for task in tasks.values())


def test_container_args_hold_only_placeholders_both_targets_resolve(example_project: Path, tmp_path: Path) -> None:
    """One spec for Vertex AI and KFP: KFP's launcher resolves only input/output placeholders in
    container args (the job's name, uuid and creation time reach a step as task inputs, the
    way the kfp SDK passes them), so no arg may hold any other ``{{$...}}``."""
    import re

    (example_project / "conf" / "base" / "mlflow.yml").write_text("server:\n  mlflow_tracking_uri: http://127.0.0.1:9\n")
    spec = compile_spec(example_project, tmp_path / "p.json", "--env", "base")
    resolvable = re.compile(r"\{\{\$\.(inputs\.parameters\['[^']+'\]|outputs\.parameters\['[^']+'\]\.output_file)\}\}")
    executors = spec["deploymentSpec"]["executors"]
    assert {"exec-mlflow-start-run", "exec-mlflow-end-run"} <= set(executors)
    for name, executor in executors.items():
        for arg in executor["container"]["args"]:
            leftover = resolvable.sub("", arg)
            assert "{{$" not in leftover, f"{name}: {arg}"
    pipeline_placeholders = set()

    def walk(dag: dict) -> None:
        for task in dag.get("tasks", {}).values():
            for source in task.get("inputs", {}).get("parameters", {}).values():
                constant = source.get("runtimeValue", {}).get("constant")
                if isinstance(constant, str) and constant.startswith("{{$"):
                    pipeline_placeholders.add(constant)
    walk(spec["root"]["dag"])
    for component in spec["components"].values():
        walk(component.get("dag", {}))
    assert pipeline_placeholders == {"{{$.pipeline_job_name}}", "{{$.pipeline_job_uuid}}",
                                     "{{$.pipeline_job_create_time_utc}}"}


def test_yaml_output_and_stable_task_names(example_project: Path, tmp_path: Path) -> None:
    first = compile_spec(example_project, tmp_path / "a.yaml", "--env", "cloud")
    second = compile_spec(example_project, tmp_path / "b.json", "--env", "cloud")
    assert first["root"] == second["root"] and first["components"] == second["components"]


@pytest.mark.kedro
def test_local_datasets_shared_between_steps_are_warned_about(example_project: Path, tmp_path: Path) -> None:
    result = kvx(example_project, "compile", "--env", "base", "--output", str(tmp_path / "p.json"))
    assert result.returncode == 0
    warnings = [json.loads(line)["message"] for line in result.stderr.splitlines()
                if line.startswith("{") and '"WARNING"' in line]
    local = [w for w in warnings if "local path" in w]
    assert len(local) == 3
    assert any("'metrics'" in w and "data_science.evaluate_model_node" in w
               and "reporting.build_report_node" in w for w in local)


def test_gcs_fuse_paths_count_as_shared_on_vertex_ai_only(example_project: Path, tmp_path: Path) -> None:
    (example_project / "conf" / "fuse").mkdir()
    (example_project / "conf" / "fuse" / "globals.yml").write_text("outputs: /gcs/kvx-example-bucket/outputs\n")

    def local_path_warnings(*command: str) -> list[str]:
        result = kvx(example_project, *command, "--env", "fuse", "--output", str(tmp_path / "p.yaml"))
        assert result.returncode == 0, result.stderr[-2000:]
        return [json.loads(line)["message"] for line in result.stderr.splitlines()
                if line.startswith("{") and '"WARNING"' in line and "local path" in line]

    # The three datasets that the base environment keeps on local disk are all under outputs.
    assert local_path_warnings("compile") == []
    on_kubeflow = local_path_warnings("kfp", "compile")
    assert len(on_kubeflow) == 3, on_kubeflow
    assert all("/gcs/kvx-example-bucket/outputs" in w and "Kubeflow pods do not have" in w for w in on_kubeflow)
    assert any("'metrics'" in w for w in on_kubeflow)


@pytest.mark.kedro
def test_mlflow_projects_get_start_task_and_exit_handler(example_project: Path, tmp_path: Path) -> None:
    (example_project / "conf" / "base" / "mlflow.yml").write_text(
        "server:\n  mlflow_tracking_uri: http://127.0.0.1:1\n")
    spec = compile_spec(example_project, tmp_path / "p.json", "--env", "cloud")
    root_tasks = spec["root"]["dag"]["tasks"]
    assert set(root_tasks) == {"exit-handler-1", "mlflow-end-run"}
    end = root_tasks["mlflow-end-run"]
    assert end["triggerPolicy"] == {"strategy": "ALL_UPSTREAM_TASKS_COMPLETED"}
    assert end["inputs"]["parameters"]["status"] == {"taskFinalStatus": {"producerTask": "exit-handler-1"}}
    inner = spec["components"]["comp-exit-handler-1"]["dag"]["tasks"]
    assert "mlflow-start-run" in inner and len(inner) == 11
    step = inner["data-processing-preprocess-companies-node"]
    assert "mlflow-start-run" in step["dependentTasks"]
    assert step["inputs"]["parameters"]["mlflow_run_id"] == {"taskOutputParameter": {
        "outputParameterKey": "mlflow_run_id", "producerTask": "mlflow-start-run"}}
    assert "--mlflow-run-id" in executor_args(spec, "data-processing-preprocess-companies-node")
    start_args = executor_args(spec, "mlflow-start-run")
    assert "{{$.outputs.parameters['mlflow_run_id'].output_file}}" in start_args


def test_tag_grouping_resources_selectors_and_retries(example_project: Path, tmp_path: Path) -> None:
    for module in ("data_science",):
        path = example_project / "src" / "spaceflights_kvx" / "pipelines" / module / "pipeline.py"
        text = path.read_text()
        text = text.replace('name="split_data_node"', 'name="split_data_node", tags=["group.fit"]')
        text = text.replace('name="fit_scaler_node"', 'name="fit_scaler_node", tags=["group.fit"]')
        text = text.replace('name="train_model_node"', 'name="train_model_node", tags=["group.fit", "gpu"]')
        path.write_text(text)
    config = example_project / "conf" / "cloud" / "vertexai.yml"
    config.write_text(textwrap.dedent("""
        run_config:
          image: img:1
          root: bucket/prefix
          grouping: {cls: kvx_runtime.grouping.TagNodeGrouper}
          resources:
            __default__: {cpu: 500m, memory: 1Gi}
            gpu: {gpu: 1, memory: 8Gi}
            no_such_node: {cpu: 1}
          node_selectors:
            gpu: {cloud.google.com/gke-accelerator: NVIDIA_L4}
          retries:
            __default__: {max_retry_count: 2, backoff_duration: 10}
          network:
            host_aliases: [{ip: 10.0.0.5, hostnames: [mlflow.internal, mlflow]}]
          env: {EXTRA: "1"}
    """))
    result = kvx(example_project, "compile", "--env", "cloud", "--output", str(tmp_path / "p.json"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "no_such_node" in result.stderr  # unknown selector key: one warning
    spec = json.loads((tmp_path / "p.json").read_text())
    validate(spec)
    tasks = spec["root"]["dag"]["tasks"]
    assert "fit" in tasks and len(tasks) == 8
    args = executor_args(spec, "fit")
    assert [args[i + 1] for i, a in enumerate(args) if a == "--node"] == [
        "data_science.split_data_node", "data_science.fit_scaler_node", "data_science.train_model_node"]
    container = spec["deploymentSpec"]["executors"]["exec-fit"]["container"]
    assert container["resources"]["accelerator"]["type"] == "NVIDIA_L4"
    assert container["resources"]["resourceMemoryLimit"] == "8Gi"
    assert {"name": "KVX_HOST_ALIASES", "value": "10.0.0.5=mlflow.internal,mlflow"} in container["env"]
    assert {"name": "EXTRA", "value": "1"} in container["env"]
    assert tasks["fit"]["retryPolicy"]["maxRetryCount"] == 2
    assert tasks["fit"]["retryPolicy"]["backoffDuration"] == "10s"


def test_compile_errors_are_clear(example_project: Path, tmp_path: Path) -> None:
    result = kvx(example_project, "compile", "--env", "cloud", "--params", "data_science.nope:int",
                 "--output", str(tmp_path / "p.json"))
    assert result.returncode == 2 and "no such Kedro parameter" in result.stderr
    result = kvx(example_project, "compile", "--env", "cloud", "--params", "reporting.title:int",
                 "--output", str(tmp_path / "p.json"))
    assert result.returncode == 2 and "is not a int" in result.stderr
    config = example_project / "conf" / "base" / "vertexai.yml"
    config.write_text(config.read_text().replace("cpu: 2\n", "cpu: lots\n"))
    result = kvx(example_project, "compile", "--env", "cloud", "--output", str(tmp_path / "p.json"))
    assert result.returncode == 2
    assert "run_config.resources.data_science.train_model_node.cpu" in result.stderr


GENERATED_PIPELINE = """
from kedro.pipeline import Node, Pipeline
from bigproj.nodes import step

def register_pipelines():
    nodes = [Node(step, None if i == 0 else f"d{i - 1}", f"d{i}", name=f"node_{i}") for i in range(1000)]
    # Fan-in every 50 nodes so the graph is not just a chain.
    nodes += [Node(step, [f"d{i}" for i in range(j, j + 50)], f"agg{j}", name=f"agg_{j}")
              for j in range(0, 1000, 50)]
    return {"__default__": Pipeline(nodes)}
"""


def test_a_1000_node_pipeline_compiles(tmp_path: Path) -> None:
    project = make_project(tmp_path, "bigproj", "def step(*args):\n    return 1\n", GENERATED_PIPELINE,
                           vertexai="run_config: {image: img, root: bucket/x}\n")
    spec = compile_spec(project, tmp_path / "big.json")
    assert len(spec["root"]["dag"]["tasks"]) == 1020
    assert spec["root"]["dag"]["tasks"]["agg-50"]["dependentTasks"][0] == "node-50"


def test_run_local_of_the_compiled_spec_matches_kedro_run(example_project: Path, kedro_run_reports,
                                                          tmp_path: Path) -> None:
    spec = tmp_path / "p.json"
    compile_spec(example_project, spec, "--env", "base", "--params", "reporting.top_n:int")
    result = kvx(example_project, "run-local", str(spec), "--max-parallel", "2", "--job-name", "rl",
                 timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    status = json.loads((example_project / ".kvx" / "runs" / "rl" / "status.json").read_text())
    assert set(status["states"].values()) == {"done"}
    assert reports(example_project, status["run_id"]) == kedro_run_reports
    assert (example_project / ".kvx" / "storage" / "kedro-vertexai-temp" / "rl" / "regressor.bin").exists()


FAILING_NODES = """
def make(n):
    return list(range(n)), n

def explode(values, limit):
    if len(values) > limit:
        raise ValueError(f"too many values: {len(values)} > {limit}")
    return values

def notify(status, made):
    return f"final state: {status['state']} after making {made}"
"""
FAILING_PIPELINE = """
from kedro.pipeline import Node, Pipeline
from failproj.nodes import explode, make, notify

def register_pipelines():
    main = Pipeline([Node(make, "params:n", ["values", "made"], name="make"),
                     Node(explode, ["values", "params:limit"], "checked", name="explode"),
                     Node(len, "checked", "size", name="count")])
    # "made" is read by the exit handler only: the main step must store it all the same.
    exit_pipe = Pipeline([Node(notify, ["params:kvx_final_status", "made"], "notice", name="notify")])
    return {"__default__": main, "notify": exit_pipe}
"""


def test_failing_node_stops_run_local_and_the_exit_handler_sees_failed(tmp_path: Path) -> None:
    project = make_project(
        tmp_path, "failproj", FAILING_NODES, FAILING_PIPELINE,
        catalog="notice:\n  type: text.TextDataset\n  filepath: data/notice.txt\n",
        vertexai="run_config: {image: img, root: bucket/x, on_exit_pipeline: notify}\n",
    )
    (project / "conf" / "base" / "parameters.yml").write_text("n: 5\nlimit: 3\n")
    spec = compile_spec(project, tmp_path / "f.json", "--env", "base")
    assert "on-exit" in spec["root"]["dag"]["tasks"]
    result = kvx(project, "run-local", str(tmp_path / "f.json"), "--job-name", "fj", timeout=600)
    assert result.returncode == 1
    out = result.stdout
    assert "1 step failed, 1 skipped:" in out
    assert "  explode: exit 1: node 'explode' raised ValueError: too many values: 5 > 3" in out
    assert "replay: cd " in out and "kvx-runtime exec-node --node explode" in out
    status = json.loads((project / ".kvx" / "runs" / "fj" / "status.json").read_text())
    assert status["states"] == {"make": "done", "explode": "failed", "count": "skipped", "on-exit": "done"}
    assert (project / "data" / "notice.txt").read_text() == "final state: FAILED after making 5"
    assert "step 'explode' of job fj failed" in result.stderr

    # The replay command works as printed (from the project directory).
    replay = out.split("replay: ")[1].strip().splitlines()[0]
    replayed = subprocess.run(replay.replace(" kvx-runtime ", f" {sys.executable} -m kvx_runtime ", 1),
                              shell=True, capture_output=True, text=True, env=step_env(), timeout=120)
    assert replayed.returncode == 1 and "too many values" in replayed.stderr

    # With a higher limit (a pipeline parameter override) the same spec succeeds.
    spec_with_param = compile_spec(project, tmp_path / "g.json", "--env", "base", "--params", "limit:int")
    assert spec_with_param["root"]["inputDefinitions"]["parameters"]["limit"]["defaultValue"] == 3
    result = kvx(project, "run-local", str(tmp_path / "g.json"), "--param", "limit=10", "--job-name", "gj",
                 timeout=600)
    assert result.returncode == 0, result.stdout[-2000:]
    assert (project / "data" / "notice.txt").read_text() == "final state: SUCCEEDED after making 5"


@pytest.mark.kedro
def test_kedro_vertexai_plugin_commands(example_project: Path, tmp_path: Path) -> None:
    kedro = [sys.executable, "-m", "kedro"]
    (example_project / "conf" / "base" / "vertexai.yml").unlink()
    init = subprocess.run([*kedro, "vertexai", "init", "my-proj", "europe-west4"], cwd=example_project,
                          env=step_env(), capture_output=True, text=True, timeout=300)
    assert init.returncode == 0, init.stderr[-2000:]
    written = yaml.safe_load((example_project / "conf" / "base" / "vertexai.yml").read_text())
    assert written["project_id"] == "my-proj" and written["region"] == "europe-west4"
    assert written["run_config"]["root"] == "my-proj-pipelines/spaceflights-kvx"
    again = subprocess.run([*kedro, "vertexai", "init", "my-proj", "europe-west4"], cwd=example_project,
                           env=step_env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "already exists" in again.stderr
    forced = subprocess.run([*kedro, "vertexai", "init", "my-proj", "us-central1", "--force", "--with-dockerfile"],
                            cwd=example_project, env=step_env(), capture_output=True, text=True, timeout=300)
    assert forced.returncode == 0, forced.stderr[-2000:]
    assert yaml.safe_load((example_project / "conf" / "base" / "vertexai.yml").read_text())["region"] == "us-central1"
    assert (example_project / "Dockerfile").read_text().startswith("# Image of a Kedro project")
    assert "conf/local/" in (example_project / ".dockerignore").read_text()
    compiled = subprocess.run([*kedro, "vertexai", "-e", "cloud", "compile", "-o", str(tmp_path / "k.json")],
                              cwd=example_project, env=step_env(KEDRO_CONFIG_COMMIT_ID="abc123"),
                              capture_output=True, text=True, timeout=300)
    assert compiled.returncode == 0, compiled.stderr[-2000:]
    spec = json.loads((tmp_path / "k.json").read_text())
    validate(spec)
    executor = next(iter(spec["deploymentSpec"]["executors"].values()))["container"]
    assert executor["image"].endswith("spaceflights-kvx:abc123")
    assert {"name": "KEDRO_CONFIG_COMMIT_ID", "value": "abc123"} in executor["env"]


def test_run_local_with_code_upload_runs_the_archive(example_project: Path, kedro_run_reports,
                                                     tmp_path: Path) -> None:
    spec = compile_spec(example_project, tmp_path / "code.json", "--env", "base", "--code-upload",
                        "--storage-root", str(tmp_path / "storage"))
    args = executor_args(spec, "data-processing-preprocess-companies-node")
    reference = args[args.index("--code") + 1]
    assert reference.startswith(f"{tmp_path / 'storage'}/kvx-code/") and "#sha256=" in reference
    # The workspace changes after compiling: the steps run what was packaged, not this.
    nodes = example_project / "src" / "spaceflights_kvx" / "pipelines" / "data_processing" / "nodes.py"
    nodes.write_text(nodes.read_text() + "\nraise RuntimeError('the workspace changed after compiling')\n")
    result = kvx(example_project, "run-local", str(tmp_path / "code.json"), "--job-name", "code-job",
                 "--storage-root", str(tmp_path / "storage"), timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    status = json.loads((example_project / ".kvx" / "runs" / "code-job" / "status.json").read_text())
    assert reports(example_project, status["run_id"]) == kedro_run_reports

    # An image built from other requirements refuses the archive: exit 2, nothing run.
    (example_project / ".kvx-requirements.sha256").write_text("0" * 64 + "\n")
    replay = subprocess.run([*KVX, "exec-node", "--node", "data_processing.preprocess_companies_node", "--env",
                             "base", "--storage-root", str(tmp_path / "storage"), "--code", reference],
                            cwd=example_project, env=step_env(), capture_output=True, text=True, timeout=300)
    assert replay.returncode == 2
    assert "requirements changed since the image was built" in replay.stderr


@pytest.mark.kedro
def test_fused_steps_give_kedro_runs_outputs(example_project: Path, kedro_run_reports, tmp_path: Path) -> None:
    """chain, then auto on the durations that run logged: fewer steps (a retried node never
    fused with others, a fused step asking for its nodes' largest resources), the same outputs."""
    config = example_project / "conf" / "base" / "vertexai.yml"
    original = config.read_text()
    retried = "  retries:\n    data_science.evaluate_model_node: {max_retry_count: 2}\n"
    config.write_text(original + retried + "  grouping: {cls: chain}\n")
    spec = compile_spec(example_project, tmp_path / "chain.json", "--env", "base")
    tasks = spec["root"]["dag"]["tasks"]
    assert len(tasks) == 7  # 10 nodes: 30% fewer steps
    fused = "data-processing-create-model-input-table-node-and-3-more"
    args = executor_args(spec, fused)
    assert [args[i + 1] for i, a in enumerate(args) if a == "--node"] == [
        "data_processing.create_model_input_table_node", "data_science.split_data_node",
        "data_science.fit_scaler_node", "data_science.train_model_node"]
    resources = spec["deploymentSpec"]["executors"][f"exec-{fused}"]["container"]["resources"]
    assert resources["resourceMemoryLimit"] == "4Gi" and resources["resourceCpuLimit"] == "2"  # train's
    result = kvx(example_project, "run-local", "--max-parallel", "2", "--job-name", "chain", timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "10 nodes grouped into 7 steps by chain: modelled cloud wall time 420 s -> 240 s" in result.stderr
    status = json.loads((example_project / ".kvx" / "runs" / "chain" / "status.json").read_text())
    assert len(status["states"]) == 7 and set(status["states"].values()) == {"done"}
    assert reports(example_project, status["run_id"]) == kedro_run_reports

    config.write_text(original + retried + "  grouping: {cls: auto}\n")
    result = kvx(example_project, "run-local", "--max-parallel", "2", "--job-name", "auto", timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "node durations of earlier runs" in result.stderr
    status = json.loads((example_project / ".kvx" / "runs" / "auto" / "status.json").read_text())
    assert len(status["states"]) <= 3 and set(status["states"].values()) == {"done"}
    assert "data-science-evaluate-model-node" in status["states"]  # its retry policy is its own
    assert reports(example_project, status["run_id"]) == kedro_run_reports
