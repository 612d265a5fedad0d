"""kvx-runtime benchmarks: the numbers we promise, measured side by side with the reference.

    python bench/run.py [--quick] [--large] [--runs N]
                        [--only intermediates,step,mlflow,compiler,fusion,local,cache,image,code,reliability,
                               logging,doctor]

Writes ``bench/results/latest.json`` (every figure: name, unit, median, min, max, runs) and
regenerates ``docs/benchmarks.md``. Each figure is the median of at least 3 runs in this
invocation; comparisons are ratios of figures measured here, side by side. ``--quick``
shrinks the objects, pipelines and fault trials (about five minutes in all). The image section
(real buildah builds: root, buildah, debootstrap and a package index; about fifteen minutes)
runs only when named: ``--only image,code`` (``make bench-image``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from integration.images import Buildah

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "integration" / "example_project"
RESULTS = REPO / "bench" / "results" / "latest.json"
DOCS = REPO / "docs" / "benchmarks.md"
PY = sys.executable
WORKER = REPO / "bench" / "worker.py"


@dataclass
class Figure:
    name: str
    unit: str
    runs: list[float]
    group: str
    goal: str | None = None
    met: bool | None = None
    note: str | None = None
    #: The --only section that measured it: a partial run replaces its sections' figures.
    section: str | None = None

    @property
    def median(self) -> float:
        return statistics.median(self.runs)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "unit": self.unit, "median": self.median, "min": min(self.runs),
                "max": max(self.runs), "runs": self.runs, "group": self.group, "goal": self.goal,
                "met": self.met, "note": self.note, "section": self.section}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Figure:
        return cls(data["name"], data["unit"], data["runs"], data["group"], goal=data.get("goal"),
                   met=data.get("met"), note=data.get("note"), section=data.get("section"))


def merge_partial(previous: list[dict[str, Any]], fresh: list[Figure], ran: set[str]) -> list[Figure]:
    """A partial run's figures in the last run's order: each figure it measured replaces the old
    one; a figure of a section it ran that it no longer measures goes (an old value is never shown
    as this run's); the other sections' figures stay; new figures come last."""
    measured = {figure.name: figure for figure in fresh}
    merged = []
    for data in previous:
        if data["name"] in measured:
            merged.append(measured.pop(data["name"]))
        elif data.get("section") not in ran:
            merged.append(Figure.from_json(data))
    return merged + list(measured.values())


@dataclass
class Bench:
    runs: int
    quick: bool
    figures: list[Figure] = field(default_factory=list)
    section: str | None = None  # the section being measured

    def add(self, name: str, unit: str, runs: list[float], group: str, **extra: Any) -> Figure:
        figure = Figure(name, unit, [round(r, 6) for r in runs], group, section=self.section, **extra)
        self.figures.append(figure)
        print(f"  {name}: {figure.median:.4g} {unit} (min {min(runs):.4g}, max {max(runs):.4g})", flush=True)
        return figure

    def get(self, name: str) -> Figure:
        return next(f for f in self.figures if f.name == name)

    def ratio(self, name: str, numerator: str, denominator: str, group: str, goal: str | None = None,
              check: Any = None, note: str | None = None) -> Figure:
        top, bottom = self.get(numerator), self.get(denominator)
        runs = [a / b for a, b in zip(top.runs, bottom.runs, strict=False) if b]
        figure = self.add(name, "x", runs, group, goal=goal, note=note)
        if check is not None:
            figure.met = bool(check(figure.median))
        return figure


def env() -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("KEDRO_CONFIG_", "KVX_"))}
    clean.update({"KVX_LOG_FORMAT": "json", "KEDRO_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true",
                  "MLFLOW_DISABLE_TELEMETRY": "true", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"})
    return clean


def timed(command: list[str], cwd: Path, extra_env: dict[str, str] | None = None) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of a child process."""
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=cwd, env={**env(), **(extra_env or {})},
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    stderr = process.stderr.read().decode(errors="replace") if process.stderr else ""
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise RuntimeError(f"{' '.join(command[:6])} failed ({code}):\n{stderr[-2000:]}")
    return seconds, usage.ru_maxrss * 1024


def worker(action: str, fmt: str, kind: str, size_mb: float, root: str, extra_env: dict[str, str]) -> dict:
    result = subprocess.run([PY, str(WORKER), action, fmt, kind, str(size_mb), root], capture_output=True,
                            text=True, env={**env(), **extra_env})
    if result.returncode != 0:
        raise RuntimeError(f"worker {action} {fmt} {kind} failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


# --- 1. intermediates ----------------------------------------------------------------------

#: Extra memory a blob save or load may take beyond the object (the goal): 0.35x the
#: object, or 128 MiB whichever is larger.
OVERHEAD_GOAL_RATIO, OVERHEAD_GOAL_MIB = 0.35, 128


def bench_intermediates(
    bench: Bench, objects: list[tuple[str, str, float]], roots: list[tuple[str, str, dict]],
    formats: tuple[str, ...] = ("kvx", "bz2", "pickle"),
) -> None:
    for root_label, root, root_env in roots:
        for label, kind, size_mb in objects:
            print(f"intermediates: {label} on {root_label}", flush=True)
            group = f"intermediates ({root_label})"
            for fmt in formats:
                values: dict[str, list[float]] = {k: [] for k in ("save", "load", "bytes", "save_rss", "load_rss",
                                                                 "save_extra", "load_extra")}
                for _ in range(bench.runs):
                    saved = worker("save", fmt, kind, size_mb, root, root_env)
                    loaded = worker("load", fmt, kind, size_mb, root, root_env)
                    values["save"].append(saved["seconds"])
                    values["load"].append(loaded["seconds"])
                    values["bytes"].append(saved["stored_bytes"] / 2**20)
                    values["save_rss"].append(saved["rss_ratio"])
                    values["load_rss"].append(loaded["rss_ratio"])
                    # Beyond the object: a save's peak over the process holding it, a load's
                    # peak minus the loaded object itself.
                    values["save_extra"].append(saved["extra_rss"] / 2**20)
                    values["load_extra"].append((loaded["extra_rss"] - loaded["object_bytes"]) / 2**20)
                prefix = f"{label} [{root_label}] {fmt}"
                bench.add(f"{prefix} save", "s", values["save"], group)
                bench.add(f"{prefix} load", "s", values["load"], group)
                bench.add(f"{prefix} stored", "MiB", values["bytes"], group)
                # The memory goal is about large objects: for small ones the fixed buffers dominate.
                judged = fmt == "kvx" and size_mb >= 100
                for op in ("save", "load"):
                    ratios = values[f"{op}_rss"]
                    bench.add(f"{prefix} {op} peak RSS / object", "x", ratios, group,
                              goal="< 1.3" if judged else None,
                              met=(statistics.median(ratios) < 1.3) if judged else None)
                    if fmt == "kvx":
                        extra = values[f"{op}_extra"]
                        allowed = max(OVERHEAD_GOAL_RATIO * size_mb * 10**6 / 2**20, OVERHEAD_GOAL_MIB)
                        wanted = f"<= {OVERHEAD_GOAL_RATIO}x object or {OVERHEAD_GOAL_MIB} MiB"
                        bench.add(f"{prefix} {op} extra memory beyond the object", "MiB", extra, group,
                                  goal=wanted if judged else None,
                                  met=(statistics.median(extra) <= allowed) if judged else None)
            base = f"{label} [{root_label}]"
            if "bz2" in formats:
                for op in ("save", "load"):
                    bench.ratio(f"{base} bz2/kvx {op} speed-up", f"{base} bz2 {op}", f"{base} kvx {op}", group,
                                goal=">= 15", check=lambda v: v >= 15)
            if "pickle" in formats:
                for op in ("save", "load"):
                    bench.ratio(f"{base} kvx/pickle {op} time", f"{base} kvx {op}", f"{base} pickle {op}", group,
                                goal="<= 2", check=lambda v: v <= 2)


# --- 2. step overhead ----------------------------------------------------------------------

REFERENCE_INIT = """
import sys
from pathlib import Path
from kedro.framework.session import KedroSession
from kedro.framework.startup import bootstrap_project
bootstrap_project(Path.cwd())
with KedroSession.create(Path.cwd(), env="base") as session:
    session.load_context()
"""


def step_project(tmp: Path, name: str = "step-project") -> Path:
    """The example project with kedro-mlflow's hooks off for all three variants alike."""
    project = tmp / name
    shutil.copytree(EXAMPLE, project, ignore=shutil.ignore_patterns(".kvx", "08_reporting", "__pycache__"))
    settings = project / "src" / "spaceflights_kvx" / "settings.py"
    settings.write_text(settings.read_text() + '\nDISABLE_HOOKS_FOR_PLUGINS = ("kedro_mlflow",)\n')
    subprocess.run([PY, "-m", "compileall", "-q", str(project / "src")], capture_output=True)
    return project


def bench_step(bench: Bench, tmp: Path) -> None:
    print("step overhead", flush=True)
    project = step_project(tmp)
    node = "data_processing.preprocess_companies_node"
    kedro = [PY, "-m", "kedro"]
    variants = {
        "kvx-runtime exec-node": [[PY, "-m", "kvx_runtime", "exec-node", "--node", node, "--env", "base",
                                   "--run-id", "bench", "--storage-root", str(tmp / "step-storage")]],
        "kedro run --nodes (floor)": [[*kedro, "run", "--env", "base", "--nodes", node]],
        "reference: session init + kedro run": [[PY, "-c", REFERENCE_INIT],
                                                 [*kedro, "run", "--env", "base", "--nodes", node]],
    }
    extra = {"KEDRO_CONFIG_RUN_ID": "bench"}
    if not bench.quick:
        timed(variants["kedro run --nodes (floor)"][0], project, extra)  # warm the file cache
    results: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in variants}
    for _ in range(bench.runs):
        for name, commands in variants.items():  # interleaved: same conditions for each
            seconds, peak = 0.0, 0
            for command in commands:
                s, p = timed(command, project, extra)
                seconds += s
                peak = max(peak, p)
            results[name][0].append(seconds)
            results[name][1].append(peak / 2**20)
    for name, (seconds, peaks) in results.items():
        bench.add(f"step: {name} wall", "s", seconds, "step overhead")
        bench.add(f"step: {name} peak RSS", "MiB", peaks, "step overhead")
    bench.ratio("step: exec-node / kedro run", "step: kvx-runtime exec-node wall",
                "step: kedro run --nodes (floor) wall", "step overhead", goal="<= 1.0", check=lambda v: v <= 1.0)
    bench.ratio("step: reference / kedro run", "step: reference: session init + kedro run wall",
                "step: kedro run --nodes (floor) wall", "step overhead")
    import_profile(bench, project, tmp)


def start_mlflow_server(root: Path) -> tuple[subprocess.Popen, str]:
    """A real MLflow server on 127.0.0.1 (SQLite store), as the tests start it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    root.mkdir(parents=True, exist_ok=True)
    process = subprocess.Popen(
        [str(Path(PY).with_name("mlflow")), "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "artifacts"),
         "--workers", "1"], cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={**env(), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"})
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return process, f"http://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.2)
    process.kill()
    process.wait()
    raise RuntimeError("the MLflow server did not start")


def bench_mlflow_step(bench: Bench, tmp: Path) -> None:
    """The same step attached to the pipeline's MLflow run (real server, kedro-mlflow's hooks
    logging into it) and with MLflow off: what attaching costs a step."""
    print("step with MLflow attached", flush=True)
    project = tmp / "mlflow-step-project"
    shutil.copytree(EXAMPLE, project, ignore=shutil.ignore_patterns(".kvx", "08_reporting", "__pycache__"))
    subprocess.run([PY, "-m", "compileall", "-q", str(project / "src")], capture_output=True)
    server, url = start_mlflow_server(tmp / "mlflow-server")
    try:
        extra = {"KEDRO_CONFIG_RUN_ID": "bench", "KEDRO_CONFIG_MLFLOW_TRACKING_URI": url}
        started = subprocess.run([PY, "-m", "kvx_runtime", "mlflow-start", "--env", "local", "--run-id", "bench",
                                  "--job-name", "bench", "--output", str(tmp / "mlflow-run-id")],
                                 cwd=project, env={**env(), **extra}, capture_output=True, text=True)
        if started.returncode != 0:
            raise RuntimeError(f"mlflow-start failed:\n{started.stderr[-2000:]}")
        run_id = (tmp / "mlflow-run-id").read_text().strip()
        step = [PY, "-m", "kvx_runtime", "exec-node", "--node", "data_processing.preprocess_companies_node",
                "--run-id", "bench", "--job-name", "bench", "--storage-root", str(tmp / "mlflow-step-storage")]
        variants = {"MLflow attached": [*step, "--env", "local", "--mlflow-run-id", run_id],
                    "MLflow off": [*step, "--env", "base"]}
        for command in variants.values():
            timed(command, project, extra)  # warm the file cache
        results: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in variants}
        for _ in range(bench.runs):
            for name, command in variants.items():  # interleaved: same conditions for each
                seconds, peak = timed(command, project, extra)
                results[name][0].append(seconds)
                results[name][1].append(peak / 2**20)
    finally:
        server.terminate()
        server.wait(timeout=30)
    group = "step overhead"
    for name, (seconds, peaks) in results.items():
        bench.add(f"step: exec-node, {name} wall", "s", seconds, group)
        bench.add(f"step: exec-node, {name} peak RSS", "MiB", peaks, group)
    bench.ratio("step: MLflow attached / MLflow off", "step: exec-node, MLflow attached wall",
                "step: exec-node, MLflow off wall", group, goal="<= 1.25", check=lambda v: v <= 1.25)


def import_profile(bench: Bench, project: Path, tmp: Path) -> None:
    """What a step imports (python -X importtime), repeated like every other figure."""
    node = "data_processing.preprocess_companies_node"
    forbidden = {
        "kvx_runtime.compiler": "the compiler",
        "mlflow": "mlflow (MLflow is off in this step)",
        "gcsfs": "gcsfs (the storage root is local)",
        "kvx_runtime.local_runner": "the local runner",
    }
    present: dict[str, list[float]] = {label: [] for label in forbidden.values()}
    cumulative: dict[str, list[float]] = {}
    for _ in range(bench.runs):
        result = subprocess.run([PY, "-X", "importtime", "-m", "kvx_runtime", "exec-node", "--node", node,
                                 "--env", "base", "--run-id", "bench", "--storage-root", str(tmp / "step-storage")],
                                cwd=project, env={**env(), "KEDRO_CONFIG_RUN_ID": "bench"},
                                capture_output=True, text=True)
        modules: dict[str, int] = {}
        imported: set[str] = set()
        for line in result.stderr.splitlines():
            match = re.match(r"import time:\s+\d+ \|\s+(\d+) \|( +)(\S+)", line)
            if not match:
                continue
            imported.add(match.group(3))
            if len(match.group(2)) == 1:  # top-level imports carry the cumulative time
                top = match.group(3).split(".")[0]
                modules[top] = modules.get(top, 0) + int(match.group(1))
        for module, label in forbidden.items():
            present[label].append(1.0 if module in imported else 0.0)
        for top, micros in modules.items():
            cumulative.setdefault(top, []).append(micros / 1e6)
    for label, values in present.items():
        bench.add(f"import: {label} imported", "bool", values, "import profile",
                  goal="not imported", met=not any(values))
    heaviest = sorted(cumulative.items(), key=lambda kv: -statistics.median(kv[1]))[:6]
    for top, values in heaviest:
        if len(values) == bench.runs:
            bench.add(f"import: {top} (cumulative)", "s", values, "import profile")


# --- 3. compiler ---------------------------------------------------------------------------

GENERATED = """
from kedro.pipeline import Node, Pipeline

def step(*args):
    return 1

def register_pipelines():
    size = int(__import__("os").environ["KVX_BENCH_NODES"])
    nodes = [Node(step, None if i == 0 else f"d{i - 1}", f"d{i}", name=f"node_{i}") for i in range(size)]
    nodes += [Node(step, [f"d{i}" for i in range(j, min(j + 10, size))], f"agg{j}", name=f"agg_{j}")
              for j in range(0, size, 10)]
    return {"__default__": Pipeline(nodes)}
"""

COMPILE_TIMER = """
import json, sys, time
from kvx_runtime.compiler import CompileRequest, compile_pipeline, write_spec
started = time.perf_counter()
compiled = compile_pipeline(CompileRequest(project_path=sys.argv[1], env="base"))
elapsed = time.perf_counter() - started
path = write_spec(compiled.spec, sys.argv[2])
print(json.dumps({"seconds": elapsed, "bytes": path.stat().st_size, "tasks": len(compiled.steps)}))
"""


def generated_project(tmp: Path, grouping: str = "identity") -> Path:
    project = tmp / f"generated-{grouping}"
    package = project / "src" / "benchgen"
    if package.exists():
        return project
    package.mkdir(parents=True)
    (project / "conf" / "base").mkdir(parents=True)
    (project / "conf" / "local").mkdir(parents=True)
    (project / "pyproject.toml").write_text(
        '[tool.kedro]\npackage_name = "benchgen"\nproject_name = "benchgen"\n'
        'kedro_init_version = "1.0.0"\nsource_dir = "src"\n')
    (package / "__init__.py").write_text("")
    (package / "settings.py").write_text("")
    (package / "pipeline_registry.py").write_text(GENERATED)
    (project / "conf" / "base" / "catalog.yml").write_text("{}\n")
    (project / "conf" / "base" / "parameters.yml").write_text("{}\n")
    (project / "conf" / "base" / "vertexai.yml").write_text(
        f"run_config: {{image: img, root: bucket/x, grouping: {{cls: {grouping}}}}}\n")
    return project


def bench_compiler(bench: Bench, tmp: Path, sizes: list[int]) -> None:
    for size, grouping in [(size, "identity") for size in sizes] + [(1000, "auto")]:
        project = generated_project(tmp, grouping)
        print(f"compiler: {size} nodes, {grouping} grouping", flush=True)
        in_process, wall, spec_bytes, steps = [], [], [], []
        for _ in range(bench.runs):
            extra = {"KVX_BENCH_NODES": str(size)}
            started = time.perf_counter()
            result = subprocess.run([PY, "-c", COMPILE_TIMER, str(project), str(tmp / f"spec-{size}.json")],
                                    env={**env(), **extra}, capture_output=True, text=True)
            wall.append(time.perf_counter() - started)
            if result.returncode != 0:
                raise RuntimeError(result.stderr[-2000:])
            data = json.loads(result.stdout.strip().splitlines()[-1])
            in_process.append(data["seconds"])
            spec_bytes.append(data["bytes"] / 2**20)
            steps.append(data["tasks"])
        goal = {"goal": "< 2", "met": statistics.median(in_process) < 2} if size == 1000 else {}
        if grouping == "identity":
            bench.add(f"compile: {size} nodes (+{size // 10} fan-in), compile", "s", in_process, "compiler", **goal)
            bench.add(f"compile: {size} nodes, whole process", "s", wall, "compiler")
            bench.add(f"compile: {size} nodes, spec size", "MiB", spec_bytes, "compiler")
        else:
            bench.add(f"compile: {size} nodes (+{size // 10} fan-in), {grouping} grouping, compile", "s", in_process,
                      "compiler", note=f"{int(statistics.median(steps))} steps", **goal)


# --- 4. local runner -----------------------------------------------------------------------

def bench_local(bench: Bench, tmp: Path) -> None:
    print("local runner", flush=True)
    project = step_project(tmp, "local-project")
    spec = tmp / "local-spec.json"
    subprocess.run([PY, "-m", "kvx_runtime", "compile", "--env", "base", "-o", str(spec)], cwd=project, env=env(),
                   check=True, capture_output=True)
    run_local, kedro_run = [], []
    for index in range(bench.runs):
        seconds, _ = timed([PY, "-m", "kvx_runtime", "run-local", str(spec), "--max-parallel", "2",
                            "--job-name", f"bench-{index}"], project)
        run_local.append(seconds)
        seconds, _ = timed([PY, "-m", "kedro", "run", "--env", "base"], project, {"KEDRO_CONFIG_RUN_ID": f"k{index}"})
        kedro_run.append(seconds)
    bench.add("run-local: example project (10 steps, 2 parallel)", "s", run_local, "local runner")
    bench.add("run-local: kedro run of the same pipeline", "s", kedro_run, "local runner")
    bench.ratio("run-local / kedro run", "run-local: example project (10 steps, 2 parallel)",
                "run-local: kedro run of the same pipeline", "local runner",
                note="every step is a separate process that starts Kedro, as on Vertex AI")


# --- 4b. step fusion ----------------------------------------------------------------------

FUSION_TIMER = """
import dataclasses, json, sys
from kvx_runtime.compiler import CompileRequest
from kvx_runtime.compiler.loading import load_project_facts
from kvx_runtime.compiler.planner import grouping_context, plan_steps
from kvx_runtime.grouping import build_grouper, modelled_wall_seconds
from kvx_runtime.grouping.timings import earlier_node_durations

project, env, root, start = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
request = CompileRequest(project_path=project, env=env, storage_root=root, step_start_seconds=start)
facts = load_project_facts(request)
durations = earlier_node_durations(facts.project_path)
context = dataclasses.replace(grouping_context(request, facts), durations=durations)
found = {}
for name in ("identity", "chain", "auto"):
    graph = plan_steps(facts.pipeline, build_grouper(name, {}), context)
    found[name] = {"steps": len(graph.groups),
                   "wall": modelled_wall_seconds(list(graph.groups.values()), graph.needs, durations, start)}
print(json.dumps({"nodes": len(facts.pipeline.nodes), "timed": len(durations), "groupers": found}))
"""

#: Vertex AI's start-up per step (a machine, then the image): what the modelled wall time charges.
VERTEX_STEP_START_SECONDS = 60.0


def bench_fusion(bench: Bench, tmp: Path) -> None:
    """Steps and modelled cloud wall time (steps' start-ups plus node times along the critical
    path, node times from a run-local of the same project) per grouper; outputs of fused runs
    equal `kedro run` in the tests (integration/test_compile_and_run_local.py, test_real_projects.py)."""
    projects = {"example project": (EXAMPLE, "base", ["--env", "base"]),
                "real-world project": (REPO / "integration" / "real_world_project", "base", ["--env", "base"])}
    for label, (source, kedro_env, args) in projects.items():
        print(f"fusion: {label}", flush=True)
        project = tmp / f"fusion-{source.name}"
        shutil.copytree(source, project, ignore=shutil.ignore_patterns(".kvx", "08_reporting", "__pycache__"))
        root = str(tmp / f"fusion-root-{source.name}")
        spec = tmp / f"fusion-{source.name}.json"
        subprocess.run([PY, "-m", "kvx_runtime", "compile", *args, "--storage-root", root, "-o", str(spec)],
                       cwd=project, env=env(), check=True, capture_output=True)
        ran = subprocess.run([PY, "-m", "kvx_runtime", "run-local", str(spec), "--max-parallel", "2",
                              "--job-name", "fusion-timings"], cwd=project, env=env(), capture_output=True, text=True)
        if ran.returncode != 0:
            raise RuntimeError(f"run-local of the {label} failed:\n{ran.stderr[-2000:]}")
        result = subprocess.run([PY, "-c", FUSION_TIMER, str(project), kedro_env, root, str(VERTEX_STEP_START_SECONDS)],
                                cwd=project, env=env(), capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"fusion planning of the {label} failed:\n{result.stderr[-2000:]}")
        found = json.loads(result.stdout.strip().splitlines()[-1])
        group = "step fusion"
        note = (f"{found['nodes']} nodes, {found['timed']} timed by run-local, "
                f"{VERTEX_STEP_START_SECONDS:.0f} s per step start")
        for name, figures in found["groupers"].items():
            bench.add(f"fusion: {label} steps ({name})", "steps", [figures["steps"]], group,
                      note=note if name == "identity" else None)
            bench.add(f"fusion: {label} modelled cloud wall time ({name})", "s", [figures["wall"]], group)
        for name in ("chain", "auto"):
            bench.ratio(f"fusion: {label} steps {name} / identity", f"fusion: {label} steps ({name})",
                        f"fusion: {label} steps (identity)", group, goal="<= 0.8", check=lambda v: v <= 0.8)
            bench.ratio(f"fusion: {label} modelled wall {name} / identity",
                        f"fusion: {label} modelled cloud wall time ({name})",
                        f"fusion: {label} modelled cloud wall time (identity)", group,
                        goal="<= 0.85", check=lambda v: v <= 0.85)


# --- 5. step cache -------------------------------------------------------------------------

PLAN_TIMER = """
import json, sys, time
from pathlib import Path
from kedro.framework.project import pipelines, settings
from kedro.framework.session import KedroSession
from kedro.framework.startup import bootstrap_project
from kvx_runtime.cache.key import key_context_of, step_keys
from kvx_runtime.cache.planning import verdicts
from kvx_runtime.cache.store import StepCache
from kvx_runtime.config_loader import exported_storage_root
from kvx_runtime.project import disable_plugin_hooks, entry_points_of_disabled_plugins_not_loaded

project, root = Path(sys.argv[1]), sys.argv[2]
started = time.perf_counter()
metadata = bootstrap_project(project)
disable_plugin_hooks(settings, ("kedro-mlflow", "kedro_mlflow"))  # as plan and run-local's serving do
with entry_points_of_disabled_plugins_not_loaded(settings):
    session = KedroSession.create(project, env="base")
with session, exported_storage_root(root):
    context = session.load_context()
    pipeline = pipelines["__default__"]
    loaded = time.perf_counter()
    key_context = key_context_of(context, pipeline, {node.name: [node.name] for node in pipeline.nodes},
                                 package_name=metadata.package_name)
    keys = step_keys(key_context)
    keyed = time.perf_counter()
    found = verdicts(keys, StepCache(root))
    looked_up = time.perf_counter()
print(json.dumps({"session": loaded - started, "keys": keyed - loaded, "lookups": looked_up - keyed,
                  "steps": len(keys), "cacheable": sum(key.cacheable for key in keys.values()),
                  "hits": sum(verdict.hit for verdict in found)}))
"""

SERVED = "step served from the cache: its nodes do not run"


def _plan_timer(project: Path, root: Path, extra_env: dict[str, str] | None = None) -> dict[str, Any]:
    """Session, keys (one step per node) and index lookups, timed in a fresh process."""
    result = subprocess.run([PY, "-c", PLAN_TIMER, str(project), str(root)], cwd=project,
                            env={**env(), **(extra_env or {})}, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-2000:])
    return json.loads(result.stdout.strip().splitlines()[-1])


def _logged_run(command: list[str], cwd: Path) -> tuple[float, float, list[tuple[float, str]]]:
    """Wall seconds, wall-clock start (epoch) and the (epoch, message) of each JSON log line."""
    from datetime import datetime

    started_at = time.time()
    started = time.perf_counter()
    result = subprocess.run(command, cwd=cwd, env=env(), capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:6])} failed ({result.returncode}):\n{result.stderr[-2000:]}")
    events = []
    for line in result.stderr.splitlines():
        try:
            record = json.loads(line)
            events.append((datetime.fromisoformat(record["time"]).timestamp(), str(record["message"])))
        except (ValueError, KeyError, TypeError):
            continue  # not a log line
    return seconds, started_at, events


def bench_cache(bench: Bench, tmp: Path, quick: bool) -> None:
    """Issue 23's goals: a second unchanged ``run-local --cache on`` of the example project takes at
    most 10% of the first, and where its time goes; planning 1,000 steps takes under 2 s."""
    print("step cache: run-local --cache on, first and unchanged second runs", flush=True)
    group = "step cache"
    project = step_project(tmp, "cache-project")
    steps = 10
    # Each first run on an empty storage root; quick: one first run, then every second run after it.
    firsts = 1 if quick else bench.runs
    after_each = bench.runs if quick else 1
    first, second, ratio = [], [], []
    phases: dict[str, list[float]] = {"start-up and compile": [], "session, keys, lookups and serving": [],
                                      "serving alone (first to last step served)": [], "after serving": []}
    for index in range(firsts):
        root = tmp / f"cache-storage-{index}"
        command = [PY, "-m", "kvx_runtime", "run-local", "--cache", "on", "--storage-root", str(root),
                   "--max-parallel", "2"]
        seconds, _, events = _logged_run([*command, "--job-name", f"cache-first-{index}"], project)
        if any(message == SERVED for _, message in events):
            raise RuntimeError("the first run on an empty storage root served a step")
        first.append(seconds)
        for repeat in range(after_each):
            again, started_at, events = _logged_run([*command, "--job-name", f"cache-second-{index}-{repeat}"],
                                                    project)
            served = [at for at, message in events if message == SERVED]
            compiled = [at for at, message in events if message == "pipeline compiled"]
            if len(served) != steps or not compiled:
                raise RuntimeError(f"the unchanged second run served {len(served)} of {steps} steps")
            second.append(again)
            ratio.append(100 * again / seconds)
            phases["start-up and compile"].append(compiled[0] - started_at)
            phases["session, keys, lookups and serving"].append(served[-1] - compiled[0])
            phases["serving alone (first to last step served)"].append(served[-1] - served[0])
            phases["after serving"].append(started_at + again - served[-1])
    compile_alone, plan = [], []
    for _ in range(bench.runs):
        seconds, _ = timed([PY, "-m", "kvx_runtime", "compile", "--env", "base", "--image", "local",
                            "--storage-root", str(tmp / "cache-storage-0"), "-o", str(tmp / "cache-spec.json")],
                           project)
        compile_alone.append(seconds)
        plan.append(_plan_timer(project, tmp / "cache-storage-0"))
    if any(found["hits"] != steps for found in plan):
        raise RuntimeError(f"planning the example project found {[found['hits'] for found in plan]} hits, "
                           f"not {steps}")
    bench.add(f"cache: run-local --cache on, first run (example project, {steps} steps, empty storage root)", "s",
              first, group)
    bench.add("cache: run-local --cache on, unchanged second run (every step served)", "s", second, group)
    bench.add("cache: second run / first run", "%", ratio, group, goal="<= 10%",
              met=statistics.median(ratio) <= 10)
    for phase, values in phases.items():
        bench.add(f"cache: second run, {phase}", "s", values, group)
    bench.add("cache: kvx-runtime compile alone (whole process, for comparison)", "s", compile_alone, group)
    for part, label in (("session", "session (bootstrap, session, load_context)"),
                        ("keys", f"keys of the {steps} steps"), ("lookups", f"{steps} index lookups (hits)")):
        bench.add(f"cache: example project in process, {label}", "s", [found[part] for found in plan], group)

    nodes = 1000
    print(f"step cache: planning {nodes} nodes (+{nodes // 10} fan-in), one step per node", flush=True)
    generated = tmp / "generated" if (tmp / "generated").exists() else generated_project(tmp)
    empty = tmp / "cache-empty-root"
    timings = [_plan_timer(generated, empty, {"KVX_BENCH_NODES": str(nodes)}) for _ in range(bench.runs)]
    count = timings[0]["steps"]
    if any(found["hits"] or found["cacheable"] != count for found in timings):
        raise RuntimeError("planning the generated pipeline against an empty cache found hits or uncacheable steps")
    keys = [found["keys"] for found in timings]
    both = [found["keys"] + found["lookups"] for found in timings]
    bench.add(f"cache: plan {count} steps, session of the generated project", "s",
              [found["session"] for found in timings], group)
    bench.add(f"cache: plan {count} steps, keys", "s", keys, group)
    bench.add(f"cache: plan {count} steps, keys + index lookups (empty local cache)", "s", both, group,
              goal="< 2", met=statistics.median(both) < 2)


# --- 6. logging ---------------------------------------------------------------------------

REDACTION_TIMER = r"""
import json, logging, os, sys, time
from kvx_runtime.log import configure_logging

rounds = int(sys.argv[1])
size = 2**20
# Lines that make a backtracking pattern rescan: a long word, long names before "key", URLs
# with "user:" and no "@", runs of the characters the patterns look for, real secrets to replace.
families = {
    "a long word": "a" * size,
    "a long word ending in key": "x" * (size - 3) + "key",
    "a long name before key=": "a-b_" * (size // 4) + "key=value",
    "key repeated": "key" * (size // 3),
    "a URL with user: and no @": "https://user:" + "p" * size,
    "many ://a:b": "://a:b" * (size // 6),
    "a run of =": "=" * size,
    "a run of :": ":" * size,
    "?key= repeated": "?key=" * (size // 5),
    "&key=v repeated": "&key=v" * (size // 6),
    "token= repeated": "token=" * (size // 6),
}
configure_logging(json_output=True)
sys.stderr = open(os.devnull, "w")  # the handler writes to whatever sys.stderr is
user = logging.getLogger("bench.node")  # a node's line, rendered and redacted like every line
worst = []
for _ in range(rounds):
    seconds = {}
    for name, line in families.items():
        started = time.perf_counter()
        user.error(line)
        seconds[name] = time.perf_counter() - started
    family = max(seconds, key=seconds.get)
    worst.append((seconds[family], family))
print(json.dumps({"worst": worst}), file=sys.__stdout__)
"""


def bench_logging(bench: Bench) -> None:
    """Every log line (a node's exception message, a long --param value) is redacted: a 1 MB
    single-line message through the step's JSON log pipeline, the slowest of its line families."""
    print("logging: redaction of 1 MB lines", flush=True)
    result = subprocess.run([PY, "-c", REDACTION_TIMER, str(bench.runs)], cwd=REPO, env=env(), capture_output=True,
                            text=True, timeout=300)
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-2000:])
    worst = json.loads(result.stdout.strip().splitlines()[-1])["worst"]
    seconds = [value for value, _ in worst]
    families = sorted({family for _, family in worst})
    bench.add("redaction of a 1 MB single-line log message (JSON line to the step's log, worst line family)", "s",
              seconds, "logging", goal="< 1", met=statistics.median(seconds) < 1,
              note=f"slowest family: {', '.join(families)}")


def bench_doctor(bench: Bench, tmp: Path) -> None:
    """``kvx-runtime doctor`` offline, the whole command: the example project with a ``gs://``
    root, no credentials file, and a metadata server on a closed port (google-auth retries)."""
    print("doctor: offline with a gs:// root", flush=True)
    project = tmp / "doctor-project"
    shutil.copytree(EXAMPLE, project, ignore=shutil.ignore_patterns(".kvx", "__pycache__", "08_reporting", "mlruns"))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = f"127.0.0.1:{sock.getsockname()[1]}"
    offline = {**env(), "GCE_METADATA_HOST": closed, "GCE_METADATA_IP": closed,
               "CLOUDSDK_CONFIG": str(tmp / "doctor-gcloud")}
    for key in ("STORAGE_EMULATOR_HOST", "GOOGLE_APPLICATION_CREDENTIALS", "GOOGLE_CLOUD_PROJECT"):
        offline.pop(key, None)
    seconds = []
    for _ in range(bench.runs):
        started = time.perf_counter()
        result = subprocess.run([PY, "-m", "kvx_runtime", "doctor", "--env", "base", "--storage-root",
                                 "gs://kvx-bench-offline/pipelines"], cwd=project, env=offline, capture_output=True,
                                text=True, timeout=300)
        seconds.append(time.perf_counter() - started)
        if result.returncode != 3 or "FAIL storage" not in result.stdout:  # else it was not offline
            raise RuntimeError(f"doctor offline exited {result.returncode}:\n{result.stdout}{result.stderr[-2000:]}")
    bench.add("doctor offline with a gs:// root (whole command, example project)", "s", seconds, "doctor",
              goal="<= 5 s", met=statistics.median(seconds) <= 5)


# --- machine, GCS emulator, output ---------------------------------------------------------

def bench_code_upload(bench: Bench, tmp: Path) -> None:
    """From a code change to a step running it: code upload against an image rebuild."""
    print("code upload", flush=True)
    sys.path.insert(0, str(REPO))
    from kvx_runtime.code_upload import build_archive, upload_archive

    project = step_project(tmp, "code-project")
    nodes = project / "src" / "spaceflights_kvx" / "pipelines" / "data_processing" / "nodes.py"
    created, sizes, change_to_step = [], [], []
    node = "data_processing.preprocess_companies_node"
    for run in range(bench.runs):
        nodes.write_text(nodes.read_text() + f"\n# change {run}\n")  # a code change
        started = time.perf_counter()
        archive = build_archive(project, "spaceflights_kvx")
        created.append(time.perf_counter() - started)
        sizes.append(len(archive.data) / 1024)
        reference = upload_archive(archive, str(tmp / "code-root"))
        step_seconds, _ = timed([PY, "-m", "kvx_runtime", "exec-node", "--node", node, "--env", "base", "--run-id",
                                 f"code-{run}", "--storage-root", str(tmp / "code-root"), "--code", reference],
                                project, {"KVX_CODE_CACHE": str(tmp / f"code-cache-{run}")})
        change_to_step.append(time.perf_counter() - started)
        print(f"  archive {sizes[-1]:.0f} KiB in {created[-1]:.2f}s; change to step done {change_to_step[-1]:.1f}s "
              f"(step {step_seconds:.1f}s)", flush=True)
    group = "code upload"
    bench.add("code upload: archive of the example project", "KiB", sizes, group)
    bench.add("code upload: archive creation", "s", created, group)
    bench.add("code upload: code change -> step done (archive, upload, step with --code)", "s", change_to_step, group)
    rebuild = _image_rebuild_seconds(tmp, bench.runs)
    if rebuild:
        bench.add("image rebuild: code change -> image built (buildah, warm layer cache)", "s", rebuild, group,
                  note="plus a push to the registry and the step itself on Vertex AI")
        bench.ratio("image rebuild / code upload (to a running step)", "image rebuild: code change -> image built "
                    "(buildah, warm layer cache)", "code upload: code change -> step done (archive, upload, step "
                    "with --code)", group, goal=">= 3", check=lambda v: v >= 3)


def _image_rebuild_seconds(tmp: Path, runs: int) -> list[float]:
    """Rebuilds of the example project image after a code change (buildah, warm layer cache),
    as the last image section measured them (IMAGE_REBUILD); [] when it has not run here (the
    figure is then left out)."""
    if not IMAGE_REBUILD.exists():
        return []
    return [float(v) for v in json.loads(IMAGE_REBUILD.read_text()).get("seconds", [])]


# --- 7. images -----------------------------------------------------------------------------

IMAGE_SIZES = REPO / "bench" / "results" / "image-sizes.json"
IMAGE_REBUILD = REPO / "bench" / "results" / "image-rebuild.json"


def bench_image(bench: Bench, tmp: Path) -> None:
    """The images' sizes (the Python base, the base image's slim and full-mlflow flavours, the
    example project's image on the slim one), and what a code change costs without code
    upload: rebuilds of the project image (buildah, warm layer cache). Needs root, buildah and
    debootstrap (skipped, saying why, elsewhere). Writes IMAGE_SIZES and IMAGE_REBUILD, which
    the code upload section and docs/benchmarks.md read."""
    sys.path.insert(0, str(REPO))
    from integration.images import (
        RUNTIME_FULL,
        Buildah,
        build_project_image,
        build_python_base,
        build_runtime_image,
    )

    buildah = Buildah(tmp / "buildah")
    reason = buildah.why_not()
    if reason:
        print(f"images: skipped: {reason}", flush=True)
        return
    try:
        print(f"images: base, runtime (slim, full) and example project images (buildah, {buildah.driver} storage)",
              flush=True)
        base = build_python_base(buildah, tmp)
        runtime = build_runtime_image(buildah, base, REPO, tmp)
        project = build_project_image(buildah, runtime, EXAMPLE, REPO, tmp)
        started = time.perf_counter()
        full = build_runtime_image(buildah, base, REPO, tmp, tag=RUNTIME_FULL, mlflow="full")
        print(f"  full-mlflow base image built in {time.perf_counter() - started:.0f} s", flush=True)
        doctor = buildah.run_in(full, "/usr/local/bin/kvx-entrypoint", "doctor", "--runtime-only")
        if doctor.returncode != 0 or "kedro_mlflow (mlflow 3." not in doctor.stdout:
            raise RuntimeError(f"the full-mlflow base image's doctor:\n{doctor.stdout}{doctor.stderr[-2000:]}")
        sizes = buildah.sizes(base, runtime, full, project)
        if set(sizes) != {base, runtime, full, project}:
            raise RuntimeError(f"buildah lists {sorted(sizes)}, not the four images built")
        IMAGE_SIZES.parent.mkdir(parents=True, exist_ok=True)
        IMAGE_SIZES.write_text(json.dumps({
            "Python base (Debian bookworm + python3, slimmed as python:3.11-slim)": sizes[base],
            "kvx-runtime base image (default: mlflow-skinny)": sizes[runtime],
            "kvx-runtime base image, KVX_MLFLOW=full (tag suffix -mlflow-full)": sizes[full],
            "example project image (on the default base image)": sizes[project],
        }, indent=2) + "\n")
        print(f"  sizes: {sizes}", flush=True)
        buildah.quietly("rmi", "-f", full)
        seconds = _time_rebuilds(buildah, runtime, tmp, bench.runs)
        print(f"  rebuilds after a code change: {seconds} s", flush=True)
        IMAGE_REBUILD.write_text(json.dumps({"seconds": seconds, "what": "buildah bud --layers after a one-line "
                                             "code change"}, indent=2) + "\n")
    finally:
        buildah.remove_everything()


def _time_rebuilds(buildah: Buildah, runtime: str, tmp: Path, runs: int) -> list[float]:
    """Seconds of ``runs`` rebuilds of the example project image, each after a one-line code
    change, with a warm layer cache; checked to deliver the change to the package a step imports."""
    from integration.images import project_build_args, project_context

    context = project_context(EXAMPLE, REPO, tmp / "rebuild" / "project")
    tag = "localhost/kvx-rebuild:kvx-test"
    command = ["bud", "--layers", *project_build_args(runtime, tag, context)]
    buildah(*command)  # warms the layer cache
    nodes = context / "src" / "spaceflights_kvx" / "pipelines" / "data_processing" / "nodes.py"
    seconds = []
    for change in range(runs):
        nodes.write_text(nodes.read_text() + f"\n# a code change ({change})\n")
        started = time.perf_counter()
        buildah(*command)
        seconds.append(round(time.perf_counter() - started, 2))
    installed = buildah.run_in(tag, "python3", "-c", "import inspect, spaceflights_kvx.pipelines.data_processing.nodes "
                               "as n; print(inspect.getsource(n))")
    if installed.returncode != 0 or f"# a code change ({runs - 1})" not in installed.stdout:
        raise RuntimeError(f"the rebuilt image does not hold the last code change:\n{installed.stderr[-2000:]}")
    return seconds


RELIABILITY_DOC = REPO / "docs" / "reliability.md"
_FIGURES_START, _FIGURES_END = "<!-- reliability figures: generated by bench/run.py -->", "<!-- end of figures -->"


def bench_reliability(bench: Bench, tmp: Path, quick: bool) -> None:
    """The fault-injection suite's figures: run the suite, read what each test recorded."""
    results = tmp / "faults.jsonl"
    env = {**os.environ, "KVX_FAULT_RESULTS": str(results), "KVX_FAULT_SEEDS": "2" if quick else "1,2,3,4,5",
           "KVX_SIGNAL_TRIALS": "2" if quick else "5", "KVX_SIGTERM_TRIALS": "6" if quick else "20"}
    tests = {
        "faults": ["-m", "faults", "integration/test_faults.py"],
        "fuzz": ["tests/test_config_fuzz.py"],
        "secrets": ["integration/test_secrets.py"],
        "mlflow": ["integration/test_mlflow.py", "-k", "lost_answer or lost_during or parameter_changed"],
        "refusals": ["integration/test_exec_node_errors.py", "-k",
                     "memory_root or file_is_refused or malformed_credentials or revoked_key"],
    }
    passed: dict[str, bool] = {}
    for name, args in tests.items():
        result = subprocess.run([PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args], cwd=REPO, env=env,
                                capture_output=True, text=True)
        passed[name] = result.returncode == 0
        print(f"  reliability {name}: {'passed' if passed[name] else 'FAILED'}", flush=True)
    records = [json.loads(line) for line in results.read_text().splitlines()] if results.exists() else []
    pipelines = [r for r in records if "seed" in r]  # storage faults alone, and with MLflow faults too
    steps = sum(r["steps"] for r in pipelines)
    first_time = steps - sum(r["first_attempt_failures"] for r in pipelines)
    trials = [r for r in records if "signal_trials" in r]
    any_moment = [r for r in records if r.get("sigterm_any_moment")]
    down = [r for r in records if r.get("storage_down")]
    add = bench.add
    if steps:
        add(f"steps succeeding first time at {pipelines[0]['rate']:.0%} injected GCS (and MLflow) faults "
            f"({len(pipelines)} runs of the example pipeline, {steps} steps)", "%", [100.0 * first_time / steps],
            "reliability", goal="100%", met=first_time == steps)
        add("faults injected (429, 503, resets, lost answers, delays)", "faults",
            [float(sum(sum(r["injected"].values()) for r in pipelines))], "reliability")
    add("wrong outputs under faults (outputs compared with a clean run, every blob read back)", "outputs",
        [0.0 if passed["faults"] else 1.0], "reliability", goal="0", met=passed["faults"])
    if trials:
        add(f"partial blobs after SIGTERM/SIGKILL mid-write ({sum(r['trials'] for r in trials)} trials, "
            "local and gs://)", "blobs", [0.0 if passed["faults"] else 1.0], "reliability", goal="0",
            met=passed["faults"])
        add("temporary files left after the next writer", "files", [0.0 if passed["faults"] else 1.0],
            "reliability", goal="0", met=passed["faults"])
    for record in any_moment:
        others = [code for code in record["exit_codes"] if code != 143]
        add(f"exits other than 143 after SIGTERM at random moments from process start to the end of a save "
            f"({record['trials']} trials over {record['window_seconds']:.1f} s)", "exits",
            [float(len(others) if passed["faults"] else max(1, len(others)))], "reliability", goal="0",
            met=passed["faults"] and not others)
    for record in down:
        add(f"storage down for good (every request 503): time to exit 3 with a {record['budget']:g} s give-up "
            "budget", "s", [float(record["seconds"])], "reliability", goal=f"<= {record['budget']:g} s + one request",
            met=record["seconds"] <= record["budget"] + 10)
    add("refusals no retry can change (revoked key, malformed credentials file, memory:// root, a root that "
        "is a file) not ending in exit 2 at once", "cases", [0.0 if passed["refusals"] else 1.0], "reliability",
        goal="0", met=passed["refusals"])
    add("tracebacks over 2,000 fuzzed configs, --param values and storage roots", "tracebacks",
        [0.0 if passed["fuzz"] else 1.0], "reliability", goal="0", met=passed["fuzz"])
    add("secrets in logs, outputs and files at DEBUG, and secret parameters in the MLflow run", "hits",
        [0.0 if passed["secrets"] else 1.0],
        "reliability", goal="0", met=passed["secrets"])
    add("MLflow runs per pipeline under a lost create answer", "runs", [1.0 if passed["mlflow"] else 2.0],
        "reliability", goal="1", met=passed["mlflow"])
    _write_reliability_figures(bench, quick)


def _write_reliability_figures(bench: Bench, quick: bool = False) -> None:
    if not RELIABILITY_DOC.exists():
        return
    text = RELIABILITY_DOC.read_text()
    if _FIGURES_START not in text or _FIGURES_END not in text:
        return
    rows = ["| figure | value | goal | met |", "|---|---|---|---|"]
    for figure in (f for f in bench.figures if f.group == "reliability"):
        met = "" if figure.met is None else ("yes" if figure.met else "**no**")
        rows.append(f"| {figure.name} | {figure.median:.4g} {figure.unit} | {figure.goal or ''} | {met} |")
    head, rest = text.split(_FIGURES_START, 1)
    _, tail = rest.split(_FIGURES_END, 1)
    command = f"python bench/run.py --only reliability{' --quick' if quick else ''}"
    stamp = f"Last run: {time.strftime('%Y-%m-%d', time.gmtime())} (`{command}`)."
    RELIABILITY_DOC.write_text(head + _FIGURES_START + "\n" + stamp + "\n\n" + "\n".join(rows) + "\n"
                               + _FIGURES_END + tail)


def machine() -> dict[str, Any]:
    memory = 0
    with open("/proc/meminfo") as handle:
        for line in handle:
            if line.startswith("MemTotal:"):
                memory = int(line.split()[1]) * 1024
    packages = {}
    for name in ("kvx-runtime", "kedro", "kedro-mlflow", "mlflow", "pandas", "numpy", "cloudpickle", "zstandard",
                 "gcsfs", "fsspec"):
        try:
            packages[name] = version(name)
        except PackageNotFoundError:
            packages[name] = None
    return {"cores": os.cpu_count(), "memory_gib": round(memory / 2**30, 1), "python": platform.python_version(),
            "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "packages": packages}


def start_emulator() -> tuple[subprocess.Popen, dict[str, str], str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    executable = Path(PY).with_name("gcp-storage-emulator")
    process = subprocess.Popen([str(executable), "start", "--host", "127.0.0.1", "--port", str(port), "--in-memory",
                                "--default-bucket", "bench"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            time.sleep(0.1)
    # The runtime's default block size (16 MiB chunks): the emulator takes multi-chunk uploads.
    root_env = {"STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{port}"}
    return process, root_env, "gs://bench/blobs"


def render(bench: Bench, info: dict[str, Any], seconds: float) -> str:
    lines = [
        "# Benchmarks",
        "",
        "Generated by `make bench` (`python bench/run.py`); `make bench-quick` runs the same",
        "harness on small inputs in about five minutes. Every figure is the median of "
        f"{bench.runs} runs in one invocation; ratios compare figures measured side by side.",
        "Raw numbers: `bench/results/latest.json`.",
        "",
        f"Machine: {info['cores']} cores, {info['memory_gib']} GiB, Python {info['python']}, "
        f"{info['platform']}. Packages: "
        + ", ".join(f"{k} {v}" for k, v in info["packages"].items() if v) + ".",
        f"Mode: {'quick' if bench.quick else 'full'}; total {seconds / 60:.1f} min.",
        "",
    ]
    groups: dict[str, list[Figure]] = {}
    for figure in bench.figures:
        groups.setdefault(figure.group, []).append(figure)
    for group, figures in groups.items():
        lines += [f"## {group[0].upper() + group[1:]}", "", "| figure | median | min | max | goal | met |",
                  "|---|---|---|---|---|---|"]
        for figure in figures:
            met = "" if figure.met is None else ("yes" if figure.met else "**no**")
            lines.append(f"| {figure.name} | {figure.median:.4g} {figure.unit} | {min(figure.runs):.4g} | "
                         f"{max(figure.runs):.4g} | {figure.goal or ''} | {met} |")
        lines.append("")
    if IMAGE_SIZES.exists():
        sizes = json.loads(IMAGE_SIZES.read_text())
        lines += ["## Image size", "", "From the last `make bench-image` (buildah); see docs/images.md.", "",
                  "| image | size |", "|---|---|"]
        lines += [f"| {name} | {value} |" for name, value in sizes.items()] + [""]
    notes = NOTES.strip()
    missed = [f for f in bench.figures if f.met is False]
    lines += ["## Goals missed and why", ""]
    if missed:
        lines += [f"- {f.name}: {f.median:.3g} {f.unit} (goal {f.goal})" for f in missed] + [""]
    else:
        lines += ["Every goal was met in this run.", ""]
    lines += [notes, ""]
    return "\n".join(lines)


NOTES_PATH = REPO / "bench" / "NOTES.md"
NOTES = NOTES_PATH.read_text() if NOTES_PATH.exists() else ""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small inputs, about five minutes")
    parser.add_argument("--large", action="store_true", help="also the ~1 GB DataFrame")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--only",
                        default="intermediates,step,mlflow,compiler,fusion,local,cache,code,reliability,logging,doctor")
    parser.add_argument("--no-docs", action="store_true", help="do not rewrite docs/benchmarks.md")
    parser.add_argument("--render-only", action="store_true",
                        help="regenerate docs/benchmarks.md from bench/results/latest.json")
    args = parser.parse_args()
    if args.render_only:
        payload = json.loads(RESULTS.read_text())
        bench = Bench(runs=max(len(f["runs"]) for f in payload["figures"]), quick=payload["mode"] == "quick")
        bench.figures = [Figure.from_json(f) for f in payload["figures"]]
        DOCS.write_text(render(bench, payload["machine"], payload["seconds"]))
        return 0
    bench = Bench(runs=max(3, args.runs), quick=args.quick)
    only = set(args.only.split(","))
    started = time.perf_counter()
    failures: list[str] = []
    info = machine()
    with tempfile.TemporaryDirectory(prefix="kvx-bench-") as directory:
        tmp = Path(directory)
        if "intermediates" in only:
            bench.section = "intermediates"
            if args.quick:
                objects = [("DataFrame ~10 MB (mixed dtypes)", "dataframe", 10),
                           ("float32 array ~20 MB (incompressible)", "array", 20),
                           ("model-like object ~5 MB", "model", 5)]
                gcs_objects = [("model-like object ~2 MB", "model", 2)]
                gcs_large = [("float32 array ~40 MB (incompressible)", "array", 40)]
            else:
                objects = [("DataFrame ~200 MB (mixed dtypes)", "dataframe", 200),
                           ("float32 array ~400 MB (incompressible)", "array", 400),
                           ("model-like object ~64 MB", "model", 64)]
                if args.large:
                    objects.append(("DataFrame ~1 GB (mixed dtypes)", "dataframe", 1024))
                gcs_objects = [("DataFrame ~50 MB (mixed dtypes)", "dataframe", 50),
                               ("model-like object ~64 MB", "model", 64)]
                # Large objects, kvx blobs only (bz2 would take minutes a run): the memory goal.
                gcs_large = [("float32 array ~300 MB (incompressible)", "array", 300),
                             ("DataFrame ~300 MB (mixed dtypes)", "dataframe", 300)]
            emulator, emulator_env, gcs_root = start_emulator()
            try:
                bench_intermediates(bench, objects, [("local disk", str(tmp / "blobs"), {})])
                bench_intermediates(bench, gcs_objects, [("GCS emulator", gcs_root, emulator_env)])
                bench_intermediates(bench, gcs_large, [("GCS emulator", gcs_root, emulator_env)], formats=("kvx",))
            finally:
                emulator.terminate()
                emulator.wait()
        sections = [
            ("step", lambda: bench_step(bench, tmp)),
            ("mlflow", lambda: bench_mlflow_step(bench, tmp)),
            ("compiler", lambda: bench_compiler(bench, tmp, [10, 1000] if args.quick else [10, 100, 1000, 5000])),
            ("fusion", lambda: bench_fusion(bench, tmp)),
            ("local", lambda: None if args.quick else bench_local(bench, tmp)),
            ("cache", lambda: bench_cache(bench, tmp, args.quick)),
            ("image", lambda: bench_image(bench, tmp)),  # before code: its ratio reads the rebuilds
            ("code", lambda: bench_code_upload(bench, tmp)),
            ("reliability", lambda: bench_reliability(bench, tmp, args.quick)),
            ("logging", lambda: bench_logging(bench)),
            ("doctor", lambda: bench_doctor(bench, tmp)),
        ]
        for name, section in sections:
            if name not in only:
                continue
            bench.section = name
            try:
                section()
            except Exception as exc:  # one broken section must not lose the others' figures
                failures.append(f"{name}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
                print(f"section {name} failed: {exc}", file=sys.stderr, flush=True)
    seconds = time.perf_counter() - started
    if only != set(parser.get_default("only").split(",")) and RESULTS.exists():
        # A partial run updates its own figures and keeps the others of the last run.
        previous = json.loads(RESULTS.read_text())
        bench.figures = merge_partial(previous["figures"], bench.figures, only)
        seconds = float(previous.get("seconds", 0.0))
    payload = {"created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "mode": "quick" if args.quick else "full",
               "seconds": seconds, "machine": info, "failures": failures,
               "figures": [f.to_json() for f in bench.figures]}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(payload, indent=2) + "\n")
    if not args.no_docs:
        DOCS.write_text(render(bench, info, seconds))
    print(f"wrote {RESULTS}{'' if args.no_docs else ' and ' + str(DOCS)} in {seconds:.0f}s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
