"""The step cache never serves a stale hit, over random sequences of mutations.

From ``make_cache_project``, each example applies a seeded random sequence of mutations to two
copies of the project: a node function's body, a helper module a node imports, a parameter in
conf/base, a run-time ``--param``, the raw input's bytes keeping its size and modification time,
the Kedro env (conf/other has its own parameters), the table's save arguments, the salt, or back
to the state before; the last run of an example changes nothing. After each mutation the pipeline
runs step by step with the cache on in the first copy (each step a real ``exec-node`` process
with the arguments ``run-local`` gives it, one storage root over the whole example) and as a
plain in-process ``kedro run`` in the second: the table and the intermediates' values must be the
same. Which steps are served is predicted too, from a model of what each step's outputs depend
on: a step is served exactly when a run before recorded the same state of its inputs (and, for
the table at a fixed path, that table is still there), so an unchanged state serves every step.

``KVX_CACHE_PROPERTY_SEED`` (default 0) draws other sequences; ``KVX_CACHE_PROPERTY_EXAMPLES``
(2) and ``KVX_CACHE_PROPERTY_STEPS`` (7 runs after the first) make the search longer. The cost
is the processes' start-up, seconds per step: the defaults take minutes."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import pytest

from integration.conftest import KVX, make_cache_project, step_env
from kvx_runtime.storage.store import BlobStore

# Not `kedro`: the Kedro-facing paths of the cache run on the oldest Kedro in test_cache_run and
# test_cache_key; these search the cache's own logic, once.
pytestmark = [pytest.mark.slow]

PACKAGE = "cachekey"
STEPS = ("clean", "total", "tabulate")
SERVED = "step served from the cache: its nodes do not run"

#: A plain `kedro run` of the project (argv: project, env, run-time params as JSON) that prints
#: every node's outputs as JSON (the intermediates are memory datasets: a hook records them).
KEDRO_RUN = """
import json, sys
from pathlib import Path
from kedro.framework.hooks import hook_impl
from kedro.framework.project import settings
from kedro.framework.session import KedroSession
from kedro.framework.startup import bootstrap_project
from kvx_runtime.config_loader import EnvTemplatedConfigLoader


class Outputs:
    def __init__(self):
        self.values = {}

    @hook_impl
    def after_node_run(self, node, outputs):
        self.values.update(outputs)


project, env, runtime = Path(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])
bootstrap_project(project)
outputs = Outputs()
settings.set("DISABLE_HOOKS_FOR_PLUGINS", ("kedro_mlflow", "kedro-telemetry"))
settings.set("CONFIG_LOADER_CLASS", EnvTemplatedConfigLoader)
settings.set("HOOKS", (outputs,))
with KedroSession.create(project, env=env, runtime_params=runtime) as session:
    session.run()
print(json.dumps({"cleaned": outputs.values["cleaned"], "total": outputs.values["total"]}))
"""

# --- the project's mutable state: each field indexes its variants -----------------------------

#: (file under src/<package>, text in make_cache_project's version, its variants).
CODE = {
    "clean_body": ("nodes.py", "[scale(value, factor) for value in raw]",
                   ("[scale(value, factor) for value in raw]", "[scale(value, factor) + 1 for value in raw]")),
    # The third variant computes the same: the key changes, the outputs do not.
    "total_body": ("nodes.py", "return sum(cleaned)",
                   ("return sum(cleaned)", "return sum(cleaned) * 10", "return sum(cleaned) + 0")),
    "tabulate_body": ("nodes.py", "[formatting.title(label)]",
                      ("[formatting.title(label)]", '[formatting.title(label) + "!"]')),
    "helper": ("helpers.py", "value * factor", ("value * factor", "value * factor - 1")),
    # Same size: an edit the file's size cannot tell.
    "formatting": ("formatting.py", "text.title()", ("text.title()", "text.upper()", "text.lower()")),
}
BASE_PARAMS = ({"factor": 2, "label": "total"}, {"factor": 4, "label": "total"}, {"factor": 2, "label": "grand sum"})
#: conf/other overlays base: its label wins, base's factor still counts there.
OTHER_PARAMS = {"label": "other env"}
RUNTIME = ({}, {"factor": 3}, {"factor": 7}, {"label": "run time"})
#: The same size, and the file gets the same modification time whatever its content.
RAW = ("[1, 2, 3]", "[1, 2, 4]", "[4, 2, 3]")
RAW_MTIME_NS = 1_700_000_000_000_000_000
SAVE_ARGS = ("{index: false}", "{index: true}", "{index: false, sep: ';'}")
SALTS = ("", "one", "two")
ENVS = ("base", "other")


@dataclass(frozen=True)
class State:
    clean_body: int = 0
    total_body: int = 0
    tabulate_body: int = 0
    helper: int = 0
    formatting: int = 0
    params: int = 0
    runtime: int = 0
    raw: int = 0
    env: int = 0
    save_args: int = 0
    salt: int = 0

    def variants(self, name: str) -> int:
        if name in CODE:
            return len(CODE[name][2])
        return len({"params": BASE_PARAMS, "runtime": RUNTIME, "raw": RAW, "env": ENVS, "save_args": SAVE_ARGS,
                    "salt": SALTS}[name])

    @property
    def env_name(self) -> str:
        return ENVS[self.env]

    @property
    def resolved(self) -> dict[str, Any]:
        """The parameters the nodes read, as Kedro resolves them (run-time values last)."""
        params = dict(BASE_PARAMS[self.params])
        if self.env_name == "other":
            params.update(OTHER_PARAMS)
        params.update(RUNTIME[self.runtime])
        return params

    def inputs_of(self, step: str) -> tuple[Any, ...]:
        """What can change the step's outputs (and its upstream's), and nothing else: the model
        of the cache key the prediction of hits rests on."""
        common = (self.env, self.salt)
        clean = (*common, self.clean_body, self.helper, self.raw, self.resolved["factor"])
        if step == "clean":
            return clean
        total = (*clean, self.total_body)
        if step == "total":
            return total
        return (*total, self.tabulate_body, self.formatting, self.resolved["label"], self.save_args)


def write_state(project: Path, state: State, originals: dict[str, str]) -> None:
    """Every mutable file of ``project`` as ``state`` says (files it leaves equal are rewritten
    with the same text: only content counts)."""
    src = project / "src" / PACKAGE
    texts = dict(originals)
    for name, (file, original, variants) in CODE.items():
        assert original in texts[file]
        texts[file] = texts[file].replace(original, variants[getattr(state, name)])
    for file, text in texts.items():
        (src / file).write_text(text)
    (project / "conf" / "base" / "parameters.yml").write_text(json.dumps(BASE_PARAMS[state.params]))
    catalog = project / "conf" / "base" / "catalog.yml"
    catalog.write_text(originals["catalog"].replace("{index: false}", SAVE_ARGS[state.save_args]))
    (project / "conf" / "base" / "vertexai.yml").write_text(
        f"run_config:\n  cache:\n    salt: {json.dumps(SALTS[state.salt])}\n")
    raw = project / "data" / "raw.json"
    raw.write_text(RAW[state.raw])
    os.utime(raw, ns=(RAW_MTIME_NS, RAW_MTIME_NS))


KINDS = (*(field.name for field in fields(State)), "undo")


class Mutations:
    """Draws mutations: the kinds dealt from a shuffled deck (so that a dozen draws try every
    kind once), each to a random other variant of its field; "undo" goes back to the state before
    the last mutation (what an earlier run recorded is wanted again)."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.deck: list[str] = []

    def draw(self, state: State, before: State) -> tuple[str, State]:
        if not self.deck:
            self.deck = list(KINDS)
            self.rng.shuffle(self.deck)
        name = self.deck.pop()
        if name == "undo":
            return name, before
        value = self.rng.choice([index for index in range(state.variants(name)) if index != getattr(state, name)])
        return f"{name}={value}", replace(state, **{name: value})


# --- running --------------------------------------------------------------------------------

def environment() -> dict[str, str]:
    # Edits that keep a file's size within the same second would otherwise run a stale .pyc.
    return step_env(PYTHONDONTWRITEBYTECODE="1")


def start_kedro_run(project: Path, state: State) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", KEDRO_RUN, str(project), state.env_name,
                             json.dumps(RUNTIME[state.runtime])],
                            cwd=project, env=environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run_cached(project: Path, root: Path, job: str, state: State) -> dict[str, str]:
    """Each step an ``exec-node --cache on`` process (the arguments ``run-local`` gives it, the
    run-time parameters typed as it types them); step -> "served" or "ran"."""
    params = [f"--param={name}={value}" for name, value in RUNTIME[state.runtime].items()]
    outcome = {}
    for step in STEPS:
        made = subprocess.run([*KVX, "exec-node", "--node", step, "--env", state.env_name, "--run-id", job,
                               "--job-name", job, "--storage-root", str(root), "--cache", "on", *params],
                              cwd=project, env=environment(), capture_output=True, text=True, timeout=300)
        assert made.returncode == 0, f"step {step} of {job}: " + made.stderr[-3000:]
        messages = [json.loads(line).get("message") for line in made.stderr.splitlines() if line.startswith("{")]
        if SERVED in messages:
            assert "node started" not in messages
            outcome[step] = "served"
        else:
            assert "node started" in messages and "step cached" in messages, made.stderr[-3000:]
            outcome[step] = "ran"
    return outcome


def run_example(tmp_path: Path, mutations: Mutations, steps: int, name: str) -> list[str]:
    """One example: ``steps`` - 1 random mutations, then none; returns what it did."""
    cached = make_cache_project(tmp_path / "cached")
    src = cached / "src" / PACKAGE
    originals = {file: (src / file).read_text() for file in ("nodes.py", "helpers.py", "formatting.py")}
    originals["catalog"] = (cached / "conf" / "base" / "catalog.yml").read_text()
    assert "{index: false}" in originals["catalog"]
    (cached / "conf" / "other" / "parameters.yml").write_text(json.dumps(OTHER_PARAMS))
    fresh = tmp_path / "fresh"
    shutil.copytree(cached, fresh)
    root = tmp_path / "storage"

    recorded: set[tuple[str, tuple[Any, ...]]] = set()
    #: A plain kedro run's outputs depend on the state only: run once per state.
    fresh_runs: dict[State, tuple[dict[str, Any], str]] = {}
    history: list[str] = []
    state = before = State()
    for index in range(steps + 1):
        if index == 0:
            mutation = "start"
        elif index == steps:
            mutation = "no change"  # every example ends with the plainest case
        else:
            mutation, changed = mutations.draw(state, before)
            before, state = state, changed
        table_before = (cached / "data" / "table.csv").read_text() if (cached / "data" / "table.csv").exists() \
            else None
        for project in (cached, fresh):
            write_state(project, state, originals)
        kedro_run = start_kedro_run(fresh, state) if state not in fresh_runs else None
        job = f"job-{index}"
        outcome = run_cached(cached, root, job, state)
        if kedro_run is not None:
            out, err = kedro_run.communicate(timeout=300)
            assert kedro_run.returncode == 0, err[-3000:]
            fresh_runs[state] = json.loads(out.strip().splitlines()[-1]), (fresh / "data" / "table.csv").read_text()
        expected, fresh_table = fresh_runs[state]
        history.append(f"{mutation}: {outcome}")
        context = f"{name}, after {history}"

        # No stale hit: what the cached run leaves is what a fresh kedro run makes.
        assert (cached / "data" / "table.csv").read_text() == fresh_table, context
        store = BlobStore(str(root), job)
        assert {name: store.load(name) for name in ("cleaned", "total")} == expected, context

        # Served exactly when an earlier run recorded the same inputs (the fixed-path table
        # also still as that run left it): nothing changed, nothing runs.
        predicted = {step: "served" if (step, state.inputs_of(step)) in recorded else "ran" for step in STEPS}
        if predicted["tabulate"] == "served" and table_before != fresh_table:
            predicted["tabulate"] = "ran"
        assert outcome == predicted, context
        if mutation == "no change":
            assert set(outcome.values()) == {"served"}, context
        recorded.update((step, state.inputs_of(step)) for step in STEPS)
    return history


def test_random_mutation_sequences_never_make_a_stale_hit_and_an_unchanged_state_serves_every_step(
        tmp_path: Path) -> None:
    seed = int(os.environ.get("KVX_CACHE_PROPERTY_SEED", "0"))
    examples = int(os.environ.get("KVX_CACHE_PROPERTY_EXAMPLES", "2"))
    # The defaults: two examples of six mutations and an unchanged run try every kind once.
    steps = int(os.environ.get("KVX_CACHE_PROPERTY_STEPS", "7"))
    mutations = Mutations(random.Random(seed))
    for example in range(examples):
        name = f"seed {seed}, example {example}"
        history = run_example(tmp_path / f"example-{example}", mutations, steps, name)
        print(f"{name}: {history}")
