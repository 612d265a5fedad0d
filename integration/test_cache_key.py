"""The step cache's key on a real Kedro project, loaded by a real session as a step loads it:
each mutation the cache must see changes the key of exactly the steps it should (the step it
touches and every step downstream), and nothing else changes any key."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from conftest import REPO
from integration.conftest import make_cache_project

pytestmark = [pytest.mark.slow, pytest.mark.kedro]

#: Computes the keys of the steps (one per node unless argv[5] groups them, as JSON), in a fresh
#: process as a step would (argv: project, env, run-time params as JSON, salt).
KEYS = """
import json, sys
from pathlib import Path
from kedro.framework.project import pipelines, settings
from kedro.framework.session import KedroSession
from kedro.framework.startup import bootstrap_project
from kvx_runtime.cache.key import key_context_of, step_keys
from kvx_runtime.project import disable_plugin_hooks, entry_points_of_disabled_plugins_not_loaded

project, env, runtime, salt = Path(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3]), sys.argv[4]
metadata = bootstrap_project(project)
disable_plugin_hooks(settings, ("kedro-mlflow", "kedro_mlflow"))  # as compile: no MLflow set-up
with entry_points_of_disabled_plugins_not_loaded(settings):
    session = KedroSession.create(project, env=env, runtime_params=runtime)
with session:
    context = session.load_context()
    pipeline = pipelines["__default__"]
    steps = json.loads(sys.argv[5]) if len(sys.argv) > 5 else {node.name: [node.name] for node in pipeline.nodes}
    keys = step_keys(key_context_of(context, pipeline, steps, package_name=metadata.package_name, salt=salt))
print(json.dumps({step: {"digest": key.digest, "parts": dict(key.parts), "uncacheable": list(key.uncacheable)}
                  for step, key in keys.items()}))
"""
STEPS = ("clean", "total", "tabulate")


def keys(project: Path, env: str = "base", runtime: dict[str, Any] | None = None, salt: str = "",
         steps: dict[str, list[str]] | None = None) -> dict[str, Any]:
    environ = {key: value for key, value in os.environ.items() if not key.startswith("KEDRO")}
    environ["PYTHONPATH"] = os.pathsep.join([str(REPO), str(project / "src")])
    grouping = [json.dumps(steps)] if steps else []
    made = subprocess.run([sys.executable, "-c", KEYS, str(project), env, json.dumps(runtime or {}), salt, *grouping],
                          cwd=project, env=environ, capture_output=True, text=True, timeout=120)
    assert made.returncode == 0, made.stderr[-3000:]
    return json.loads(made.stdout.strip().splitlines()[-1])


def changed(before: dict[str, Any], after: dict[str, Any]) -> dict[str, list[str]]:
    """Step -> the parts whose digest changed (steps whose key did not change left out)."""
    out = {}
    for step in STEPS:
        parts = sorted(name for name in set(before[step]["parts"]) | set(after[step]["parts"])
                       if before[step]["parts"].get(name) != after[step]["parts"].get(name))
        if before[step]["digest"] != after[step]["digest"]:
            out[step] = parts
        else:
            assert not parts
    return out


@pytest.fixture
def project(tmp_path: Path) -> Path:
    return make_cache_project(tmp_path)


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))


def test_each_mutation_changes_the_keys_of_the_steps_it_touches_and_downstream_only(project: Path) -> None:
    src = project / "src" / "cachekey"
    baseline = keys(project)
    assert all(not baseline[step]["uncacheable"] for step in STEPS), baseline
    assert changed(baseline, keys(project)) == {}  # the same project: the same keys

    # Formatting, comments and another function of the node's module: no key changes.
    edit(src / "nodes.py", "def total(cleaned):\n", "# a comment\ndef total(cleaned):  # sum\n\n")
    assert changed(baseline, keys(project)) == {}

    # Each mutation in its own trial (undone after).
    seen: dict[str, dict[str, list[str]]] = {}

    def trial(name: str, mutate: Any, undo: Any) -> None:
        mutate()
        try:
            seen[name] = changed(baseline, keys(project))
        finally:
            undo()

    trial("function body",
          lambda: edit(src / "nodes.py", "return sum(cleaned)", "return sum(cleaned) + 0"),
          lambda: edit(src / "nodes.py", "return sum(cleaned) + 0", "return sum(cleaned)"))
    trial("helper module",
          lambda: edit(src / "formatting.py", "text.title()", "text.upper()"),
          lambda: edit(src / "formatting.py", "text.upper()", "text.title()"))
    trial("parameter",
          lambda: edit(project / "conf" / "base" / "parameters.yml", "label: total", "label: sum"),
          lambda: edit(project / "conf" / "base" / "parameters.yml", "label: sum", "label: total"))
    raw = project / "data" / "raw.json"
    stat = raw.stat()

    def same_size_and_mtime() -> None:
        raw.write_text("[1, 2, 4]")
        os.utime(raw, ns=(stat.st_atime_ns, stat.st_mtime_ns))

    trial("raw input content", same_size_and_mtime, lambda: raw.write_text("[1, 2, 3]"))
    trial("save arguments",
          lambda: edit(project / "conf" / "base" / "catalog.yml", "{index: false}", "{index: true}"),
          lambda: edit(project / "conf" / "base" / "catalog.yml", "{index: true}", "{index: false}"))
    seen["run-time param"] = changed(baseline, keys(project, runtime={"factor": 3}))
    seen["Kedro env"] = changed(baseline, keys(project, env="other"))
    seen["salt"] = changed(baseline, keys(project, salt="bust"))

    downstream_of_total = {"total": ["code:total"], "tabulate": ["input:total"]}
    assert seen["function body"] == downstream_of_total
    assert seen["helper module"] == {"tabulate": ["code:tabulate"]}  # only tabulate calls formatting
    assert seen["parameter"] == {"tabulate": ["param:params:label"]}
    assert seen["raw input content"] == {"clean": ["input:raw_numbers"], "total": ["input:cleaned"],
                                         "tabulate": ["input:total"]}
    assert seen["save arguments"] == {"tabulate": ["output:table"]}
    assert seen["run-time param"] == {"clean": ["param:params:factor"], "total": ["input:cleaned"],
                                      "tabulate": ["input:total"]}
    # Every step's own part, and (input addressing) the inputs from upstream steps.
    everywhere = {"clean": [], "total": ["input:cleaned"], "tabulate": ["input:total"]}
    assert seen["Kedro env"] == {step: sorted(["env", *inputs]) for step, inputs in everywhere.items()}
    assert seen["salt"] == {step: sorted(["salt", *inputs]) for step, inputs in everywhere.items()}
    # Every trial undone: the keys are the baseline's again.
    assert changed(baseline, keys(project)) == {}


def test_what_cannot_be_fingerprinted_makes_the_step_uncacheable_and_says_why(project: Path) -> None:
    edit(project / "src" / "cachekey" / "pipeline_registry.py", 'name="total")',
         'name="total", tags=["no-cache"])')
    (project / "data" / "raw.json").unlink()
    found = keys(project)
    # Where the catalog reads it (the project's data folder, made absolute as Kedro makes it).
    assert found["clean"]["uncacheable"] == [f"input raw_numbers: {(project / 'data' / 'raw.json').as_posix()} "
                                             "does not exist"]
    assert found["total"]["uncacheable"] == ["node total is tagged no-cache",
                                             "input cleaned comes from node clean, which is not cacheable"]
    assert found["tabulate"]["uncacheable"] == ["input total comes from node total, which is not cacheable"]


def test_a_steps_key_is_its_nodes_keys_whatever_the_grouping_of_the_others(project: Path) -> None:
    """A dataset made upstream counts as its node's key, so grouping nodes into steps changes no
    other step's key; inside a group, what one member hands another is not an input."""
    alone = keys(project)
    grouped = keys(project, steps={"prep": ["clean", "total"], "tabulate": ["tabulate"]})
    assert grouped["tabulate"]["digest"] == alone["tabulate"]["digest"]
    prep = grouped["prep"]["parts"]
    assert {"code:clean", "code:total", "input:raw_numbers", "output:cleaned", "output:total"} <= set(prep)
    assert "input:cleaned" not in prep
    assert prep["input:raw_numbers"] == alone["clean"]["parts"]["input:raw_numbers"]
