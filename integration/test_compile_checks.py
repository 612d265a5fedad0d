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


@pytest.mark.parametrize("catalog", ["", "frame:\n  type: MemoryDataset\n  copy_mode: assign\n"])
def test_an_uncopyable_memory_dataset_crossing_steps_is_warned(tmp_path: Path, catalog: str) -> None:
    project = make_project(tmp_path, "assigned", NODES, PIPELINES.format(package="assigned"), catalog=catalog)
    result = compile_spec(project, "--strict", "-o", str(tmp_path / "p.json"))
    if not catalog:  # nothing to warn about: --strict passes and writes the spec
        assert result.returncode == 0, result.stderr[-2000:]
        assert (tmp_path / "p.json").is_file()
        return
    assert result.returncode == 2, result.stderr[-2000:]
    [warning] = warnings_of(result)
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
