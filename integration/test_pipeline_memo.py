"""The pipeline memo end to end (docs/cache.md): with the step cache on, an unchanged project is
planned and served without importing its pipelines' code; whatever the pipelines are made of
that changes (their code, a helper, a configuration file, an environment variable, code outside
the package) makes the next command import them again and plan what they now are."""

from __future__ import annotations

import importlib.util
import os
import subprocess
from pathlib import Path

import pytest

from integration.conftest import KVX, make_cache_project, step_env
from integration.test_cache_run import plan, run_local

pytestmark = [pytest.mark.slow, pytest.mark.kedro]

STEPS = {"clean", "total", "tabulate"}
#: Appended to the project's node module: each import of it leaves a line in data/imports.log
#: (data/ is not what pipelines are made of).
IMPORT_MARKER = """
import pathlib as _pathlib
with open(_pathlib.Path(__file__).resolve().parents[2] / "data" / "imports.log", "a") as _log:
    _log.write("imported\\n")
"""
#: A registry adding a step ``extra`` when an environment variable, a configuration file or a
#: module outside the package (on PYTHONPATH) says so.
SWITCHED_REGISTRY = """
import os
import pathlib

import steps_switch
from kedro.pipeline import Pipeline, node

from .nodes import clean, tabulate, total


def register_pipelines():
    nodes = [
        node(clean, ["raw_numbers", "params:factor"], "cleaned", name="clean"),
        node(total, "cleaned", "total", name="total"),
        node(tabulate, ["total", "params:label"], "table", name="tabulate"),
    ]
    switch = pathlib.Path(__file__).resolve().parents[2] / "conf" / "base" / "switch.txt"
    if os.environ.get("CACHEKEY_EXTRA") or steps_switch.EXTRA or switch.read_text().strip() == "extra":
        nodes.append(node(total, "cleaned", "extra_total", name="extra"))
    return {"__default__": Pipeline(nodes)}
"""


def imports(project: Path) -> int:
    log = project / "data" / "imports.log"
    return len(log.read_text().splitlines()) if log.exists() else 0


@pytest.fixture
def project(tmp_path: Path) -> Path:
    made = make_cache_project(tmp_path)
    nodes = made / "src" / "cachekey" / "nodes.py"
    nodes.write_text(nodes.read_text() + IMPORT_MARKER)
    return made


def test_an_unchanged_project_is_planned_and_served_without_importing_its_pipelines(project: Path) -> None:
    assert run_local(project, "first", "--cache", "on") == dict.fromkeys(STEPS, "ran")
    table = (project / "data" / "table.csv").read_text()
    before = imports(project)
    assert before >= 1

    assert plan(project) == dict.fromkeys(STEPS, "HIT")
    assert run_local(project, "second", "--cache", "on") == dict.fromkeys(STEPS, "served")
    assert imports(project) == before
    assert (project / "data" / "table.csv").read_text() == table

    helpers = project / "src" / "cachekey" / "helpers.py"
    helpers.write_text("def scale(value, factor):\n    return value * factor + 1\n")
    verdicts = plan(project)
    assert imports(project) == before + 1
    assert {step: verdict.split()[0] for step, verdict in verdicts.items()} == dict.fromkeys(STEPS, "MISS")
    assert "code:clean" in verdicts["clean"]
    assert run_local(project, "third", "--cache", "on") == dict.fromkeys(STEPS, "ran")
    assert (project / "data" / "table.csv").read_text() == "label,total\nTotal,15\n"

    after = imports(project)
    assert plan(project) == dict.fromkeys(STEPS, "HIT")
    assert imports(project) == after


def test_the_memo_off_imports_the_pipelines_for_every_command(project: Path) -> None:
    (project / "conf" / "base" / "vertexai.yml").write_text("run_config:\n  cache:\n    remember_pipelines: false\n")
    assert run_local(project, "first", "--cache", "on") == dict.fromkeys(STEPS, "ran")
    before = imports(project)
    assert plan(project) == dict.fromkeys(STEPS, "HIT")
    assert imports(project) == before + 1
    assert not (project / ".kvx" / "pipelines").exists()


@pytest.mark.parametrize("change", ["environment variable", "configuration file", "module outside the package"])
def test_what_a_registry_reads_besides_its_code_makes_the_next_plan_see_the_new_pipeline(
        project: Path, tmp_path: Path, change: str) -> None:
    (project / "src" / "cachekey" / "pipeline_registry.py").write_text(SWITCHED_REGISTRY)
    (project / "conf" / "base" / "switch.txt").write_text("plain\n")
    outside = tmp_path / "lib"
    outside.mkdir()
    (outside / "steps_switch.py").write_text("EXTRA = False\n")
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(outside), os.environ.get("PYTHONPATH")]))}

    def planned(**extra: str) -> dict[str, str]:
        made = subprocess.run([*KVX, "plan"], cwd=project, env=step_env(**env, **extra),
                              capture_output=True, text=True, timeout=120)
        assert made.returncode == 0, made.stderr[-3000:]
        return {line.split(None, 2)[1]: line.split()[0] for line in made.stdout.splitlines()[1:]}

    assert set(planned()) == STEPS
    before = imports(project)
    assert set(planned()) == STEPS
    assert imports(project) == before  # remembered

    extra: dict[str, str] = {}
    if change == "environment variable":
        extra["CACHEKEY_EXTRA"] = "1"
    elif change == "configuration file":
        (project / "conf" / "base" / "switch.txt").write_text("extra\n")
    else:
        (outside / "steps_switch.py").write_text("EXTRA = True\n")
    assert set(planned(**extra)) == {*STEPS, "extra"}
    assert imports(project) == before + 1


@pytest.mark.skipif(importlib.util.find_spec("kedro.validation") is None,
                    reason="this Kedro does not type parameters by node annotations")
def test_parameters_typed_by_a_node_are_typed_as_kedro_types_them_when_the_pipeline_is_remembered(
        project: Path) -> None:
    nodes = project / "src" / "cachekey" / "nodes.py"
    typed = ("from dataclasses import dataclass\n\n\n@dataclass\nclass Factor:\n    value: int\n\n\n"
             "def clean(raw, factor: Factor):\n    return [scale(value, factor.value) for")
    nodes.write_text(nodes.read_text().replace("def clean(raw, factor):\n    return [scale(value, factor) for", typed))
    (project / "conf" / "base" / "parameters.yml").write_text("factor: {value: 2}\nlabel: total\n")
    assert run_local(project, "first", "--cache", "on") == dict.fromkeys(STEPS, "ran")
    assert (project / "data" / "table.csv").read_text() == "label,total\nTotal,12\n"
    before = imports(project)
    # The memo says a node types its parameters: Kedro imports the pipelines to type them.
    assert plan(project) == dict.fromkeys(STEPS, "HIT")
    assert run_local(project, "second", "--cache", "on") == dict.fromkeys(STEPS, "served")
    assert imports(project) > before


def test_a_helper_a_node_imports_inside_its_body_is_covered(project: Path) -> None:
    # src/shared_util.py, beside the package: imported only when the node runs.
    (project / "src" / "shared_util.py").write_text("OFFSET = 0\n")
    nodes = project / "src" / "cachekey" / "nodes.py"
    nodes.write_text(nodes.read_text().replace(
        "def clean(raw, factor):\n    return [scale(value, factor) for value in raw]",
        "def clean(raw, factor):\n    import shared_util\n\n"
        "    return [scale(value, factor) + shared_util.OFFSET for value in raw]"))
    assert run_local(project, "first", "--cache", "on") == dict.fromkeys(STEPS, "ran")
    assert plan(project) == dict.fromkeys(STEPS, "HIT")
    (project / "src" / "shared_util.py").write_text("OFFSET = 100\n")
    verdicts = plan(project)
    assert verdicts["clean"].startswith("MISS") and "code:clean" in verdicts["clean"]
    assert run_local(project, "second", "--cache", "on") == dict.fromkeys(STEPS, "ran")
    assert (project / "data" / "table.csv").read_text() == "label,total\nTotal,312\n"
