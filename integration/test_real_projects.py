"""A project laid out as real Kedro projects are (integration/real_world_project, "fleet_ops"),
compiled on the "laptop" and run with run-local from a copy holding exactly what its image
would hold (its .dockerignore applied: no conf/local), compared with a plain ``kedro run``.

Covers transcoding, versioned datasets written by two steps and read by a third, namespaces,
dataset factories, find_pipelines' selective loading, the default environment, failure
classification, MLflow with an exit pipeline, and a Spark <-> pandas pair (where Java runs).
"""

from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import REPO
from integration.conftest import KVX, StepRun, run_step, step_env
from kvx_runtime.dockerignore import DockerIgnore
from kvx_runtime.versions import kedro_version

pytestmark = pytest.mark.slow

PROJECT = REPO / "integration" / "real_world_project"
DECOY = "2999-01-01T00.00.00.000Z"  # "latest" for ever: what a concurrent or later run could leave


def laptop_copy(tmp_path: Path, name: str = "laptop") -> Path:
    target = tmp_path / name
    shutil.copytree(PROJECT, target, ignore=shutil.ignore_patterns("__pycache__", "mlflow.db", "mlruns", ".kvx"))
    for generated in target.glob("data/0[2-9]_*"):
        shutil.rmtree(generated)
    return target


def image_copy(project: Path, target: Path) -> Path:
    """What a build of the project image would contain: the .dockerignore applied."""
    ignore = DockerIgnore.of_project(project)
    assert ignore is not None
    for path in sorted(project.rglob("*")):
        relative = path.relative_to(project).as_posix()
        if path.is_file() and not ignore.excludes(relative):
            destination = target / relative
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, destination)
    return target


def kvx(project: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 600) -> StepRun:
    result = subprocess.run([*KVX, *args], cwd=project, env=env or step_env(), capture_output=True,
                            text=True, timeout=timeout)
    return StepRun(result.returncode, result.stdout, result.stderr)


def kedro_run(project: Path, *args: str, env: dict[str, str] | None = None) -> None:
    """A plain `kedro run` with the real Kedro CLI (kvx-runtime[mlflow] installed, so
    kedro-mlflow's hooks are active although the project does not configure MLflow)."""
    result = subprocess.run([sys.executable, "-m", "kedro", "run", *args], cwd=project,
                            env=env or step_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]


def all_tasks(spec: dict) -> dict:
    """Root tasks and the tasks inside DAG components (the exit handler's)."""
    tasks = dict(spec["root"]["dag"]["tasks"])
    for component in spec["components"].values():
        tasks.update(component.get("dag", {}).get("tasks", {}))
    return tasks


def warnings_of(run: StepRun) -> list[str]:
    return [r["message"] for r in run.records if r.get("severity") == "WARNING"]


def assert_each_warning_once(run: StepRun) -> None:
    """Third-party warnings (Kedro's, MLflow's, pandas') at most once per step."""
    warnings = warnings_of(run)
    assert len(warnings) == len(set(warnings)), sorted({w for w in warnings if warnings.count(w) > 1})
    assert all(line.startswith("{") for line in run.stderr.splitlines() if line.strip()), "non-JSON log lines"


def versions(project: Path, dataset_dir: str) -> set[str]:
    return {p.name for p in (project / dataset_dir).iterdir()}


def plant_decoys(project: Path) -> None:
    """Newer versions of the versioned datasets, holding nonsense: a step that loads
    "latest" instead of its own run's version produces different outputs."""
    import numpy as np

    for name, value in [("scaler.pkl", {"mean": np.zeros(3), "std": np.full(3, 1e-3)}),
                        ("candidate_model.pkl", {"weights": np.zeros(4), "alpha": -1.0, "names": []})]:
        path = project / "data" / "06_models" / name / DECOY / name
        path.parent.mkdir(parents=True)
        path.write_bytes(pickle.dumps(value))


@pytest.mark.kedro
def test_laptop_compile_runs_from_the_image_copy_as_kedro_run(tmp_path: Path) -> None:
    baseline = laptop_copy(tmp_path, "baseline")
    kedro_run(baseline, "--env", "base")
    assert (baseline / "mlflow.db").exists()  # kedro-mlflow's unconfigured default works (MLflow 3)

    laptop = laptop_copy(tmp_path)
    compiled = kvx(laptop, "compile", "-o", str(tmp_path / "fleet.json"))
    assert compiled.returncode == 0, compiled.stderr[-3000:]
    assert not any("out of the image" in w for w in warnings_of(compiled))
    spec = json.loads((tmp_path / "fleet.json").read_text())
    for executor in spec["deploymentSpec"]["executors"].values():
        args = executor["container"]["args"]
        assert args[args.index("--env") + 1] == "base"  # not the laptop's conf/local
    tasks = all_tasks(spec)
    # company_table@pandas written, company_table@text read: an edge Kedro has, so the spec too.
    assert "clean-companies" in tasks["count-lines"]["dependentTasks"]
    assert set(tasks["candidate-evaluate-model"]["dependentTasks"]) == {
        "build-features", "fit-scaler", "candidate-train-model"}

    image = image_copy(laptop, tmp_path / "image")
    assert not (image / "conf" / "local").exists() and (image / "conf" / "base").is_dir()
    plant_decoys(image)
    ran = kvx(image, "run-local", str(tmp_path / "fleet.json"), "--job-name", "fleet-1", "--max-parallel", "2")
    assert ran.returncode == 0, ran.stdout[-3000:] + ran.stderr[-3000:]
    status = json.loads((image / ".kvx" / "runs" / "fleet-1" / "status.json").read_text())
    assert set(status["states"].values()) == {"done"}

    for output in ["data/02_intermediate/company_table.csv", "data/08_reporting/candidate_metrics.json",
                   "data/08_reporting/report.md"]:
        assert (image / output).read_text() == (baseline / output).read_text(), output
    assert "alpha: 0.5" in (image / "data/08_reporting/report.md").read_text()  # base, not local's 25.0
    metrics = json.loads((image / "data/08_reporting/candidate_metrics.json").read_text())
    assert (image / "data/08_reporting/notice.txt").read_text() == f"pipeline SUCCEEDED: mae {metrics['mae']}\n"

    # One version per versioned dataset for the run, the run's own; the decoys untouched.
    run_version = kedro_version(status["created"])
    for dataset_dir in ("data/06_models/scaler.pkl", "data/06_models/candidate_model.pkl"):
        assert versions(image, dataset_dir) == {DECOY, run_version}, dataset_dir
    [baseline_version] = versions(baseline, "data/06_models/candidate_model.pkl")
    ours = pickle.loads((image / "data/06_models/candidate_model.pkl" / run_version / "candidate_model.pkl")
                        .read_bytes())
    theirs = pickle.loads((baseline / "data/06_models/candidate_model.pkl" / baseline_version /
                           "candidate_model.pkl").read_bytes())
    assert ours["weights"].tolist() == theirs["weights"].tolist()

    # A retried step (same run, same version) replaces what its first attempt saved.
    replay = run_step(image, "--node", "fit_scaler", "--env", "base", "--run-id", status["run_id"],
                      "--job-name", "fleet-1", "--storage-root", str(image / ".kvx" / "storage"),
                      "--save-version", status["created"])
    assert replay.returncode == 0, replay.stderr[-3000:]
    assert versions(image, "data/06_models/scaler.pkl") == {DECOY, run_version}
    assert_each_warning_once(replay)


@pytest.mark.kedro
def test_chain_fused_steps_run_from_the_image_copy_as_kedro_run(tmp_path: Path) -> None:
    """7 nodes in 4 steps (versioned datasets, transcoding, the exit pipeline unchanged), the
    same outputs as `kedro run`."""
    baseline = laptop_copy(tmp_path, "baseline")
    kedro_run(baseline, "--env", "base")
    laptop = laptop_copy(tmp_path)
    config = laptop / "conf" / "base" / "vertexai.yml"
    config.write_text(config.read_text() + "  grouping: {cls: chain}\n")
    compiled = kvx(laptop, "compile", "-o", str(tmp_path / "fleet.json"))
    assert compiled.returncode == 0, compiled.stderr[-3000:]
    assert any(message.startswith("7 nodes grouped into 4 steps by chain: modelled cloud wall time 360 s -> 180 s")
               for message in (record["message"] for record in compiled.records))
    image = image_copy(laptop, tmp_path / "image")
    ran = kvx(image, "run-local", str(tmp_path / "fleet.json"), "--job-name", "fused", "--max-parallel", "2")
    assert ran.returncode == 0, ran.stdout[-3000:] + ran.stderr[-3000:]
    status = json.loads((image / ".kvx" / "runs" / "fused" / "status.json").read_text())
    assert set(status["states"].values()) == {"done"}
    assert len([task for task in status["states"] if not task.startswith("kvx-")]) <= 5  # 4 + the exit step
    for output in ["data/02_intermediate/company_table.csv", "data/08_reporting/candidate_metrics.json",
                   "data/08_reporting/report.md"]:
        assert (image / output).read_text() == (baseline / output).read_text(), output
    metrics = json.loads((image / "data/08_reporting/candidate_metrics.json").read_text())
    assert (image / "data/08_reporting/notice.txt").read_text() == f"pipeline SUCCEEDED: mae {metrics['mae']}\n"


def test_an_env_the_image_lacks_is_caught_on_the_laptop_and_in_the_step(tmp_path: Path) -> None:
    laptop = laptop_copy(tmp_path)
    compiled = kvx(laptop, "compile", "--env", "local", "-o", str(tmp_path / "local.json"))
    assert compiled.returncode == 0, compiled.stderr[-3000:]
    assert any("config environment 'local'" in w and "conf/local/ out of the image" in w
               for w in warnings_of(compiled))
    image = image_copy(laptop, tmp_path / "image")
    step = run_step(image, "--node", "clean_companies", "--env", "local", "--storage-root", str(tmp_path / "s"))
    assert step.returncode == 2
    errors = [r for r in step.records if r.get("severity") == "ERROR"]
    assert len(errors) == 1
    assert "config environment 'local' does not exist" in errors[0]["message"]
    assert str(image / "conf" / "local") in errors[0]["message"] and "--env base" in errors[0]["message"]
    assert "Traceback" not in step.stderr


@pytest.mark.kedro
def test_failures_say_whose_fault_it_is(tmp_path: Path) -> None:
    laptop = laptop_copy(tmp_path)
    compiled = kvx(laptop, "compile", "--pipeline", "faulty", "-o", str(tmp_path / "faulty.json"))
    assert compiled.returncode == 0, compiled.stderr[-3000:]
    image = image_copy(laptop, tmp_path / "image")
    (image / "data" / "02_intermediate").mkdir(parents=True)
    shutil.copy(PROJECT / "data" / "01_raw" / "companies.csv", image / "data/02_intermediate/company_table.csv")
    ran = kvx(image, "run-local", str(tmp_path / "faulty.json"), "--job-name", "faulty-1", "--max-parallel", "1")
    status = json.loads((image / ".kvx" / "runs" / "faulty-1" / "status.json").read_text())
    # fail_slow: both independent failures happen; only the dependent step is skipped.
    assert status["states"]["make-handle"] == "failed" and status["states"]["describe-missing"] == "failed"
    assert status["states"]["use-handle"] == "skipped"
    assert status["exit_codes"]["make-handle"] == 1  # the output's problem
    assert status["exit_codes"]["describe-missing"] == 2  # the input data's problem
    assert ran.returncode in (1, 2)
    report = ran.stdout.split("steps failed")[1]
    assert ("make-handle: exit 1: output 'live_handle' cannot be pickled to cross to another step "
            "(RuntimeError: a LiveHandle is bound") in report
    assert ("describe-missing: exit 2: catalog dataset 'missing_input' could not be loaded: "
            "FileNotFoundError:") in report and "never_delivered.csv" in report
    # No partial blob (nor temp file) of the output that could not be pickled.
    job_dir = image / ".kvx" / "storage" / "kedro-vertexai-temp" / "faulty-1"
    assert [p.name for p in job_dir.rglob("*") if "live_handle" in p.name] == []

    # The step's own final line carries the hint, once, and no traceback.
    step = run_step(image, "--node", "make_handle", "--pipeline", "faulty", "--storage-root", str(tmp_path / "s"))
    assert step.returncode == 1
    assert "spark.SparkDataset" in step.last_message and "run_config.grouping" in step.last_message
    assert_each_warning_once(step)
    missing = run_step(image, "--node", "describe_missing", "--pipeline", "faulty")
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert_each_warning_once(missing)
    assert "never_delivered.csv" in missing.last_message and "replay: kvx-runtime exec-node" in missing.last_message


@pytest.mark.kedro
def test_compile_checks_that_the_exit_pipeline_loads_alone(tmp_path: Path) -> None:
    from kedro.framework.project import pipelines

    laptop = laptop_copy(tmp_path)
    registry = laptop / "src" / "fleet_ops" / "pipeline_registry.py"
    registry.write_text(registry.read_text().replace(
        "    return pipelines\n",
        '    if "notify" in pipelines and "report" in pipelines:\n'
        '        pipelines["notify_and_report"] = pipelines["notify"] + pipelines["report"]\n'
        "    return pipelines\n"))
    config = laptop / "conf" / "base" / "vertexai.yml"
    config.write_text(config.read_text().replace("on_exit_pipeline: notify", "on_exit_pipeline: notify_and_report"))
    compiled = kvx(laptop, "compile", "-o", str(tmp_path / "p.json"))
    if not hasattr(pipelines, "set_requested"):  # Kedro without selective pipeline loading
        assert compiled.returncode == 0, compiled.stderr[-2000:]
        return
    assert compiled.returncode == 2
    assert "run_config.on_exit_pipeline 'notify_and_report' exists when Kedro loads every pipeline but not " \
           "when it loads 'notify_and_report' alone" in compiled.last_message


MLFLOW_NOTICE = """notice:
  type: kedro_mlflow.io.artifacts.MlflowArtifactDataset
  dataset:
    type: text.TextDataset
    filepath: data/08_reporting/notice.txt
"""


def test_mlflow_with_an_exit_pipeline_ends_finished(tmp_path: Path, mlflow_server) -> None:
    laptop = laptop_copy(tmp_path)
    (laptop / "conf" / "base" / "mlflow.yml").write_text(textwrap.dedent("""
        server:
          mlflow_tracking_uri: ${mlflow_tracking_uri}
        tracking:
          experiment:
            name: fleet-ops
    """))
    catalog = laptop / "conf" / "base" / "catalog.yml"  # the exit pipeline logs to MLflow too
    catalog.write_text(catalog.read_text().replace(
        "notice:\n  type: text.TextDataset\n  filepath: data/08_reporting/notice.txt\n", MLFLOW_NOTICE))
    assert "MlflowArtifactDataset" in catalog.read_text()
    env = step_env(KEDRO_CONFIG_MLFLOW_TRACKING_URI=mlflow_server.url)
    compiled = kvx(laptop, "compile", "-o", str(tmp_path / "ml.json"), env=env)
    assert compiled.returncode == 0, compiled.stderr[-3000:]
    root_tasks = json.loads((tmp_path / "ml.json").read_text())["root"]["dag"]["tasks"]
    assert {"mlflow-end-run", "on-exit"} <= set(root_tasks)
    image = image_copy(laptop, tmp_path / "image")
    # One at a time, mlflow-end-run runs before on-exit (the order that used to leave the run RUNNING).
    ran = kvx(image, "run-local", str(tmp_path / "ml.json"), "--job-name", "fleet-ml", "--max-parallel", "1",
              env=env)
    assert ran.returncode == 0, ran.stdout[-3000:] + ran.stderr[-3000:]
    logs = image / ".kvx" / "runs" / "fleet-ml" / "logs"
    ended = _record_time(logs / "mlflow-end-run.log", "MLflow run ended")
    attached = _record_time(logs / "on-exit.log", "attached to the pipeline's MLflow run")
    assert ended < attached

    client = mlflow_server.client()
    experiment = client.get_experiment_by_name("fleet-ops")
    runs = client.search_runs([experiment.experiment_id], filter_string="tags.vertexai_job_name = 'fleet-ml'")
    assert len(runs) == 1
    run = client.get_run(runs[0].info.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["kvx.final_state"] == "SUCCEEDED"
    assert "notice.txt" in [a.path for a in client.list_artifacts(run.info.run_id)]


def _record_time(log: Path, message: str) -> str:
    for line in log.read_text().splitlines():
        if line.startswith("{") and json.loads(line).get("message") == message:
            return json.loads(line)["time"]
    raise AssertionError(f"{message!r} not in {log}")


def _why_no_spark() -> str | None:
    java = shutil.which("java")
    if java is None:
        return "Java is not installed (Spark needs a JVM; Debian: openjdk-17-jre-headless)"
    probe = subprocess.run([java, "-version"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"java cannot run here: {probe.stderr.strip()[:200]}"
    try:
        import pyspark  # noqa: F401
    except ImportError:
        return "pyspark is not installed (kvx-runtime's spark extra, in its dev extra)"
    return None


@pytest.mark.skipif(_why_no_spark() is not None, reason=str(_why_no_spark()))
def test_spark_writes_and_pandas_reads_one_dataset(tmp_path: Path) -> None:
    spark_env = step_env(SPARK_LOCAL_IP="127.0.0.1", PYSPARK_PYTHON=sys.executable)
    baseline = laptop_copy(tmp_path, "baseline")
    kedro_run(baseline, "--env", "spark", "--pipeline", "spark", "--nodes", "to_spark,regional_totals",
              env=spark_env)

    laptop = laptop_copy(tmp_path)
    compiled = kvx(laptop, "compile", "--env", "spark", "--pipeline", "spark", "-o", str(tmp_path / "spark.json"))
    assert compiled.returncode == 0, compiled.stderr[-3000:]
    tasks = all_tasks(json.loads((tmp_path / "spark.json").read_text()))
    assert tasks["regional-totals"]["dependentTasks"] == ["to-spark"]  # fleet@spark -> fleet@pandas
    image = image_copy(laptop, tmp_path / "image")
    ran = kvx(image, "run-local", str(tmp_path / "spark.json"), "--job-name", "spark-1", "--max-parallel", "1",
              env=spark_env)
    status = json.loads((image / ".kvx" / "runs" / "spark-1" / "status.json").read_text())
    assert status["states"]["to-spark"] == "done" and status["states"]["regional-totals"] == "done", ran.stdout
    assert ((image / "data/08_reporting/regional_totals.csv").read_text()
            == (baseline / "data/08_reporting/regional_totals.csv").read_text())
    # An undeclared Spark DataFrame cannot cross steps: the output's problem, exit 1.
    assert status["states"]["spark-frame"] == "failed" and status["exit_codes"]["spark-frame"] == 1
    assert status["states"]["count-frame"] == "skipped"
    assert "output 'fleet_frame' cannot be pickled" in ran.stdout
    assert ran.returncode == 1
    # Its log's last line is the verdict, though py4j closes the Spark connection of the node's
    # worker thread (and logs it) only when the process ends: that line is kept at DEBUG
    # (tests/test_log.py shows it at DEBUG), and the JVM writes nothing after it.
    log = (image / ".kvx" / "runs" / "spark-1" / "logs" / "spark-frame.log").read_text()
    last = json.loads(log.strip().splitlines()[-1])
    assert last["severity"] == "ERROR" and last["exit_code"] == 1, log[-3000:]
    assert last["message"].startswith("exec-node failed: output 'fleet_frame' cannot be pickled to cross to "
                                      "another step (PySpark") and "spark.SparkDataset" in last["message"]
    assert "Traceback" not in log and "Running node: spark_frame" in log

