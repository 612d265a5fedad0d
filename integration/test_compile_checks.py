"""Traps that would fail only in the cloud, caught by ``compile`` (``--strict``: exit 2 for CI).

Each test compiles a real Kedro project in a subprocess, as a user would."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from integration.conftest import KVX, make_project, step_env

pytestmark = pytest.mark.slow


def compile_spec(project: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*KVX, "compile", "--image", "img:1", "--storage-root", "gs://kvx-bucket/root", *args],
                          cwd=project, env=step_env(KVX_LOG_FORMAT="json"), capture_output=True, text=True,
                          timeout=300)


def warnings_of(result: subprocess.CompletedProcess) -> list[str]:
    return [json.loads(line)["message"] for line in result.stderr.splitlines()
            if line.startswith("{") and json.loads(line).get("severity") == "WARNING"]


def last_message(result: subprocess.CompletedProcess) -> str:
    return json.loads(result.stderr.strip().splitlines()[-1])["message"]


def test_mlflow_configured_only_where_steps_do_not_look_is_named(example_project: Path, tmp_path: Path) -> None:
    # The example keeps kedro-mlflow's file where `kedro mlflow init` writes it: conf/local.
    assert (example_project / "conf" / "local" / "mlflow.yml").is_file()
    result = compile_spec(example_project, "-o", str(tmp_path / "base.json"))
    assert result.returncode == 0, result.stderr[-2000:]
    [warning] = [w for w in warnings_of(result) if "MLflow" in w]
    assert "conf/local/mlflow.yml, which the steps do not read (they use env base)" in warning
    assert "compile with --env local, or move the file to conf/base" in result.stderr

    strict = compile_spec(example_project, "--strict", "-o", str(tmp_path / "strict.json"))
    assert strict.returncode == 2, strict.stderr[-2000:]
    assert last_message(strict).startswith("kvx-runtime compile failed: --strict: ")
    assert "MLflow configured in conf/local/mlflow.yml, not read by the steps" in last_message(strict)
    assert not (tmp_path / "strict.json").exists()
    assert "Traceback" not in strict.stderr

    tracked = compile_spec(example_project, "--env", "local", "-o", str(tmp_path / "local.json"))
    assert tracked.returncode == 0 and not [w for w in warnings_of(tracked) if "MLflow" in w]


def test_code_upload_of_an_env_that_is_never_uploaded_is_exit_2(example_project: Path, tmp_path: Path) -> None:
    result = compile_spec(example_project, "--env", "local", "--code-upload", "-o", str(tmp_path / "p.json"))
    assert result.returncode == 2, result.stderr[-2000:]
    assert "--env local with code upload: conf/local is never uploaded" in last_message(result)
    assert not (tmp_path / "p.json").exists()
    assert not list((example_project).glob("**/*.tar*"))  # refused before any archive is built


NODES = """
def make(): return [1, 2]
def use(x): return len(x)
"""
PIPELINES = """
from kedro.pipeline import Pipeline, node
from {package}.nodes import make, use

def register_pipelines():
    return {{"__default__": Pipeline([node(make, None, "frame", name="make"), node(use, "frame", "n", name="use")])}}
"""


@pytest.mark.parametrize("catalog", ["", "frame:\n  type: MemoryDataset\n  copy_mode: assign\n",
                                     "'{name}':\n  type: MemoryDataset\n  copy_mode: assign\n"],
                         ids=["none", "entry", "factory"])
def test_an_uncopyable_memory_dataset_crossing_steps_is_warned(tmp_path: Path, catalog: str) -> None:
    project = make_project(tmp_path, "assigned", NODES, PIPELINES.format(package="assigned"), catalog=catalog)
    result = compile_spec(project, "--strict", "-o", str(tmp_path / "p.json"))
    if not catalog:  # nothing to warn about: --strict passes and writes the spec
        assert result.returncode == 0, result.stderr[-2000:]
        assert (tmp_path / "p.json").is_file()
        return
    assert result.returncode == 2, result.stderr[-2000:]
    [warning] = [w for w in warnings_of(result) if "copy_mode" in w]  # Kedro warns of a catch-all too
    assert "'frame' is a MemoryDataset with copy_mode: assign" in warning and "node 'use' reads" in warning
    assert "run its producer and consumers in one step" in result.stderr


FOUND_PIPELINES = """
from kedro.framework.project import find_pipelines

def register_pipelines():
    pipelines = find_pipelines()
    pipelines["__default__"] = sum(pipelines.values())
    return pipelines
"""


def find_pipelines_project(root: Path, broken: bool) -> Path:
    """Two pipeline packages found by Kedro's ``find_pipelines()``; ``broken``: one imports a
    library that is not installed (Kedro only warns and leaves its nodes out)."""
    project = make_project(root, "found", NODES, FOUND_PIPELINES)
    for name, body in (("making", 'node(make, None, "frame", name="make")'),
                       ("using", 'node(use, "frame", "n", name="use")')):
        package = project / "src" / "found" / "pipelines" / name
        package.mkdir(parents=True)
        imports = "import kvx_library_not_installed\n" if broken and name == "using" else ""
        (package / "__init__.py").write_text(
            f"{imports}from kedro.pipeline import Pipeline, node\nfrom found.nodes import make, use\n\n"
            f"def create_pipeline(**kwargs):\n    return Pipeline([{body}])\n")
    (project / "src" / "found" / "pipelines" / "__init__.py").write_text("")
    return project


def test_a_pipeline_module_that_fails_to_import_fails_compile_and_doctor(tmp_path: Path) -> None:
    """``find_pipelines()`` turns the import error into a warning and the node ``use`` would be
    missing from every run; compile and doctor name the module and the error instead."""
    healthy = find_pipelines_project(tmp_path / "ok", broken=False)
    assert compile_spec(healthy, "--strict", "-o", str(tmp_path / "ok.json")).returncode == 0
    assert len(json.loads((tmp_path / "ok.json").read_text())["root"]["dag"]["tasks"]) >= 2

    project = find_pipelines_project(tmp_path / "broken", broken=True)
    result = compile_spec(project, "-o", str(tmp_path / "p.json"))
    assert result.returncode == 2, result.stderr[-2000:]
    assert ("the pipeline module 'found.pipelines.using' cannot be imported: ModuleNotFoundError: "
            "No module named 'kvx_library_not_installed'") in last_message(result)
    assert not (tmp_path / "p.json").exists() and "Traceback" not in result.stderr

    doctor = subprocess.run([*KVX, "doctor", "--storage-root", str(tmp_path / "store")], cwd=project,
                            env=step_env(), capture_output=True, text=True, timeout=300)
    [line] = [line for line in doctor.stdout.splitlines() if line.split()[1] == "project"]
    assert line.startswith("FAIL") and "'found.pipelines.using' cannot be imported" in line, doctor.stdout
    assert doctor.returncode == 2
    healthy_doctor = subprocess.run([*KVX, "doctor", "--storage-root", str(tmp_path / "store")], cwd=healthy,
                                    env=step_env(), capture_output=True, text=True, timeout=300)
    assert "ok   project  found (env base), 2 nodes in __default__" in healthy_doctor.stdout, healthy_doctor.stdout


def test_inputs_no_node_writes_and_the_catalog_lacks_are_refused(example_project: Path, tmp_path: Path) -> None:
    # The reporting pipeline reads what data_science writes, kept in memory between steps of
    # the whole pipeline: compiled alone, every step reading it would fail.
    alone = compile_spec(example_project, "-p", "reporting", "-o", str(tmp_path / "alone.json"))
    assert alone.returncode == 2, alone.stderr[-2000:]
    message = last_message(alone)
    assert "pipeline 'reporting' reads feature_means, preprocessed_shuttles, regressor, which none of its nodes" \
        in message and "kedro run refuses it too" in message
    assert not (tmp_path / "alone.json").exists() and "Traceback" not in alone.stderr
    catalog = example_project / "conf" / "base" / "catalog.yml"
    catalog.write_text(catalog.read_text() + "".join(
        f"\n{name}:\n  type: pickle.PickleDataset\n  filepath: ${{storage_root}}/{name}.pkl\n"
        for name in ("feature_means", "preprocessed_shuttles", "regressor")))
    declared = compile_spec(example_project, "-p", "reporting", "-o", str(tmp_path / "declared.json"))
    assert declared.returncode == 0, declared.stderr[-2000:]

    unknown = compile_spec(example_project, "--load-version", "not_a_dataset=2026-12-01T00.00.00.000Z",
                           "-o", str(tmp_path / "v.json"))
    assert unknown.returncode == 2
    assert last_message(unknown).startswith("kvx-runtime compile failed: --load-version not_a_dataset: not in the")


def set_run_config(project: Path, **settings: object) -> None:
    import yaml

    vertexai = project / "conf" / "base" / "vertexai.yml"
    config = yaml.safe_load(vertexai.read_text())
    config["run_config"].update(settings)
    vertexai.write_text(yaml.safe_dump(config))


@pytest.mark.parametrize(("settings", "expected"), [
    ({"resources": {"__default__": {"memory": "2000000K"}}}, "Kubernetes writes kilobytes k, kibibytes Ki"),
    ({"grouping": {"cls": "tag"}, "node_selectors": {
        "data_science.train_model_node": {"cloud.google.com/gke-accelerator": "NVIDIA_TESLA_A100"},
        "data_science.fit_scaler_node": {"cloud.google.com/gke-accelerator": "NVIDIA_TESLA_T4"}}},
     "disagree on cloud.google.com/gke-accelerator (NVIDIA_TESLA_A100: data_science.train_model_node; "
     "NVIDIA_TESLA_T4: data_science.fit_scaler_node)"),
], ids=["memory-K", "group-accelerators"])
def test_resources_the_cloud_would_refuse_are_refused(example_project: Path, tmp_path: Path, settings: dict,
                                                      expected: str) -> None:
    pipeline = example_project / "src" / "spaceflights_kvx" / "pipelines" / "data_science" / "pipeline.py"
    pipeline.write_text(pipeline.read_text().replace('name="fit_scaler_node")', 'name="fit_scaler_node", '
                                                     'tags=["group.train"])')
                        .replace('name="train_model_node")', 'name="train_model_node", tags=["group.train"])'))
    set_run_config(example_project, **settings)
    result = compile_spec(example_project, "-o", str(tmp_path / "p.json"))
    assert result.returncode == 2, result.stderr[-2000:]
    assert expected in last_message(result) and "Traceback" not in result.stderr


def test_gpus_without_an_accelerator_type_are_warned_for_vertex_and_refused_under_strict(
        example_project: Path, tmp_path: Path) -> None:
    set_run_config(example_project, resources={"data_science.train_model_node": {"gpu": 1}})
    warned = compile_spec(example_project, "-o", str(tmp_path / "p.json"))
    assert warned.returncode == 0, warned.stderr[-2000:]
    assert any("without an accelerator type, which Vertex AI refuses: data_science.train_model_node" in w
               for w in warnings_of(warned))
    strict = compile_spec(example_project, "--strict", "-o", str(tmp_path / "s.json"))
    assert strict.returncode == 2 and "GPUs of data_science.train_model_node without an accelerator type" \
        in last_message(strict)


def test_strict_refuses_unknown_keys_anywhere_and_not_entries_of_other_pipelines(example_project: Path,
                                                                                 tmp_path: Path) -> None:
    (example_project / "conf" / "local" / "mlflow.yml").unlink()  # its own warning is tested above
    set_run_config(example_project, resources={"data_science.train_model_node": {"cpu": 2}})
    # Another pipeline's node: used when that pipeline is compiled, not a typo.
    one = compile_spec(example_project, "-p", "data_processing", "--strict", "-o", str(tmp_path / "one.json"))
    assert one.returncode == 0, one.stderr[-2000:]
    set_run_config(example_project, resources={"data_science.train_model_node": {"cpu": 2}, "no_such_node": {"cpu": 1}})
    typo = compile_spec(example_project, "-p", "data_processing", "--strict", "-o", str(tmp_path / "typo.json"))
    assert typo.returncode == 2 and "1 warning (above): run_config.resources.no_such_node;" in last_message(typo)

    set_run_config(example_project, resources={"data_science.train_model_node": {"cpu": 2}})
    vertexai = example_project / "conf" / "base" / "vertexai.yml"
    vertexai.write_text(vertexai.read_text() + "template_repositry: https://europe-west1-kfp.pkg.dev/p/repo\n")
    top = compile_spec(example_project, "-p", "data_processing", "--strict", "-o", str(tmp_path / "top.json"))
    assert top.returncode == 2, top.stderr[-2000:]
    assert "1 warning (above): unknown key template_repositry;" in last_message(top)


def test_an_exit_pipeline_reading_what_nothing_keeps_is_refused(example_project: Path, tmp_path: Path) -> None:
    # reporting reads data_processing's preprocessed_shuttles, which a run of data_science alone never writes.
    set_run_config(example_project, on_exit_pipeline="reporting")
    alone = compile_spec(example_project, "-p", "data_science", "-o", str(tmp_path / "ds.json"))
    assert alone.returncode == 2, alone.stderr[-2000:]
    assert "run_config.on_exit_pipeline reads preprocessed_shuttles, which no node of it or of pipeline " \
           "'data_science' writes" in last_message(alone)
    whole = compile_spec(example_project, "-o", str(tmp_path / "all.json"))
    assert whole.returncode == 0, whole.stderr[-2000:]
    # Kept where the exit step can read it: data_science alone compiles, and the exit step
    # reading data_science's local metrics file on another machine is said like any crossing.
    catalog = example_project / "conf" / "base" / "catalog.yml"
    catalog.write_text(catalog.read_text() + "\npreprocessed_shuttles:\n  type: pandas.ParquetDataset\n"
                                             "  filepath: ${storage_root}/preprocessed_shuttles.parquet\n")
    kept = compile_spec(example_project, "-p", "data_science", "-o", str(tmp_path / "kept.json"))
    assert kept.returncode == 0, kept.stderr[-2000:]
    assert any("catalog dataset 'metrics' is on a local path" in w and "(on exit)' reads" in w
               for w in warnings_of(kept))
