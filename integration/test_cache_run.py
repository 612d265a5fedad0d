"""The step cache through ``run-local --cache on``, each step a real ``exec-node`` process: a
second run of an unchanged project runs no node and leaves the same outputs; a change reruns
exactly the steps it touches and those downstream; an output changed or gone since it was
recorded is a miss, never a stale hit."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from integration.conftest import KVX, make_cache_project, step_env

pytestmark = [pytest.mark.slow, pytest.mark.kedro]

STEPS = {"clean", "total", "tabulate"}


def run_local(project: Path, job: str, *extra: str) -> dict[str, str]:
    """Run the pipeline; step name -> "served" (from the cache), "ran" or "no cache"."""
    made = subprocess.run([*KVX, "run-local", "--job-name", job, *extra], cwd=project, env=step_env(),
                          capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stdout[-2000:] + made.stderr[-3000:]
    # Served before the run: never started (no log).
    outcome = {line.split()[3]: "served" for line in made.stdout.splitlines()
               if "(served from the step cache: run " in line}
    for log in (project / ".kvx" / "runs" / job / "logs").glob("*.log"):
        messages = [json.loads(line)["message"] for line in log.read_text().splitlines() if line.startswith("{")]
        if "step finished" not in messages:
            continue  # not a node step
        node = next(json.loads(line)["node"] for line in log.read_text().splitlines()
                    if line.startswith("{") and '"node"' in line)
        assert node not in outcome
        if "step served from the cache: its nodes do not run" in messages:  # by its own exec-node
            assert "node started" not in messages
            outcome[node] = "served by exec-node"
        else:
            assert "node started" in messages
            outcome[node] = "ran" if "step cached" in messages else "no cache"
    return outcome


def plan(project: Path, *extra: str) -> dict[str, str]:
    """``kvx-runtime plan``: step -> its verdict (HIT, or MISS and why)."""
    made = subprocess.run([*KVX, "plan", *extra], cwd=project, env=step_env(), capture_output=True, text=True,
                          timeout=120)
    assert made.returncode == 0, made.stderr[-3000:]
    verdicts = {}
    for line in made.stdout.splitlines()[1:]:
        verdict, step, rest = line.split(None, 2)
        verdicts[step] = verdict if verdict == "HIT" else f"{verdict} {rest}"
    return verdicts


def table(project: Path) -> str:
    return (project / "data" / "table.csv").read_text()


@pytest.fixture
def project(tmp_path: Path) -> Path:
    return make_cache_project(tmp_path)


def test_an_unchanged_project_runs_no_node_the_second_time_and_a_change_reruns_what_it_touches(
        project: Path) -> None:
    assert run_local(project, "first", "--cache", "on") == dict.fromkeys(STEPS, "ran")
    first = table(project)
    assert first == "label,total\nTotal,12\n"

    assert plan(project) == {"clean": "HIT", "total": "HIT", "tabulate": "HIT"}
    assert run_local(project, "second", "--cache", "on") == dict.fromkeys(STEPS, "served")
    assert table(project) == first

    # A parameter only tabulate reads: tabulate reruns, the others are served; plan says so first.
    params = project / "conf" / "base" / "parameters.yml"
    params.write_text(params.read_text().replace("label: total", "label: sum"))
    assert plan(project) == {"clean": "HIT", "total": "HIT",
                             "tabulate": "MISS no entry for this key; changed: param:params:label"}
    # A run-time value of a parameter that clean reads: clean and everything after it.
    assert plan(project, "--param", "factor=3") == {
        "clean": "MISS no entry for this key; changed: param:params:factor",
        "total": "MISS no entry for this key; changed: input:cleaned",
        "tabulate": "MISS no entry for this key; changed: input:total, param:params:label"}
    assert run_local(project, "third", "--cache", "on") == {"clean": "served", "total": "served",
                                                            "tabulate": "ran"}
    assert table(project) == "label,total\nSum,12\n"

    # Run-time overrides leave the decision to each step's exec-node, which serves the hits itself.
    assert run_local(project, "overridden", "--cache", "on", "--param", "unused=1") == {
        "clean": "served by exec-node", "total": "served by exec-node", "tabulate": "served by exec-node"}

    # Without the cache every node runs, and records nothing.
    assert run_local(project, "uncached", "--cache", "off") == dict.fromkeys(STEPS, "no cache")


def test_an_output_changed_or_gone_since_it_was_recorded_is_a_miss_never_a_stale_hit(project: Path) -> None:
    assert run_local(project, "first", "--cache", "on") == dict.fromkeys(STEPS, "ran")
    # The table is at a fixed path: another hand overwrites it.
    (project / "data" / "table.csv").write_text("label,total\nForged,0\n")
    # The first run's intermediates are gone (gc, a lifecycle rule).
    shutil.rmtree(project / ".kvx" / "storage" / "kedro-vertexai-temp" / "first")
    outcome = run_local(project, "second", "--cache", "on")
    assert outcome == dict.fromkeys(STEPS, "ran")
    assert table(project) == "label,total\nTotal,12\n"
    # Recorded again: the third run is served.
    assert run_local(project, "third", "--cache", "on") == dict.fromkeys(STEPS, "served")
