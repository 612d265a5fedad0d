"""What a cloud target (the fake Vertex AI API) is sent so that no step runs twice, and what
those runs then do where they execute (here: the submitted spec run by ``run-local``, each step a
real ``exec-node``); outputs stay those of a plain run:

- ``run-once --cache on``: the steps the step cache has are left out, and one ``cache-serve``
  step serves them, running any it can no longer serve;
- ``resume JOB``: a new run, as the same pipeline run, of the steps a failed run did not finish.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO
from integration.conftest import KVX, make_cache_project, step_env
from integration.fake_vertex import FakeVertex
from integration.test_cache_run import run_local, table

pytestmark = [pytest.mark.slow, pytest.mark.kedro]

VERTEXAI = """\
project_id: kvx-cache-project
region: europe-west1
run_config:
  image: europe-docker.pkg.dev/kvx-cache-project/images/cachekey:1
"""


@pytest.fixture
def vertex(fake_google):
    fake = FakeVertex(fake_google, project="kvx-cache-project", region="europe-west1").start()
    yield fake
    fake.stop()


@pytest.fixture
def project(tmp_path: Path, fake_google) -> Path:
    from integration.test_mlflow import _service_account_key

    made = make_cache_project(tmp_path)
    (made / "conf" / "base" / "vertexai.yml").write_text(VERTEXAI)
    _service_account_key(tmp_path / "adc.json", f"{fake_google.url}/token", "deployer@kvx-test.iam.gserviceaccount.com")
    return made


def run_once(project: Path, vertex: FakeVertex, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    """``run-once`` (on the project's local storage root); the pipeline spec the fake received."""
    before = set(vertex.jobs)
    env = step_env(KVX_VERTEX_ENDPOINT=vertex.url, GOOGLE_APPLICATION_CREDENTIALS=str(project.parent / "adc.json"))
    made = subprocess.run([*KVX, "run-once", "--storage-root", str(project / ".kvx" / "storage"), *args],
                          cwd=project, env=env, capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stdout[-2000:] + made.stderr[-3000:]
    (name,) = set(vertex.jobs) - before
    return made, vertex.jobs[name]["pipelineSpec"]


def argv_of(spec: dict) -> dict[str, list[str]]:
    """Task -> its container's command line."""
    found = {}
    for name, task in spec["root"]["dag"]["tasks"].items():
        label = spec["components"][task["componentRef"]["name"]]["executorLabel"]
        executor = spec["deploymentSpec"]["executors"][label]
        found[name] = [*executor["container"]["command"], *executor["container"]["args"]]
    return found


def flag_values(argv: list[str], flag: str) -> list[str]:
    return [argv[index + 1] for index, arg in enumerate(argv) if arg == flag]


def tasks_of(spec: dict) -> dict[str, list[str]]:
    """Task -> the ``--node`` values of its exec-node command."""
    return {name: flag_values(argv, "--node") for name, argv in argv_of(spec).items()}


def run_spec(project: Path, spec: dict, job: str) -> list[dict]:
    """The submitted spec run step by step here; the cache-serve step's log records."""
    path = project / f"{job}.json"
    path.write_text(json.dumps(spec))
    made = subprocess.run([*KVX, "run-local", str(path), "--job-name", job], cwd=project, env=step_env(),
                          capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stdout[-2000:] + made.stderr[-3000:]
    log = project / ".kvx" / "runs" / job / "logs" / "cache-serve.log"
    return [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")] if log.exists() else []


def entry_of(project: Path, step: str) -> Path:
    index = project / ".kvx" / "storage" / "kvx-cache"
    key = json.loads((index / "steps" / f"{step}.json").read_text())["key"]
    return index / "entries" / f"{key}.json"


def test_run_once_leaves_out_what_the_cache_has_and_the_cache_serve_step_serves_it(
        project: Path, vertex: FakeVertex) -> None:
    assert set(run_local(project, "first", "--cache", "on").values()) == {"ran"}
    first = table(project)

    made, spec = run_once(project, vertex, "--cache", "on")
    assert "Step cache: 3 of 3 steps found" in made.stdout
    assert tasks_of(spec) == {"cache-serve": ["clean", "total", "tabulate"]}
    assert flag_values(argv_of(spec)["cache-serve"], "--serve-step") == ['["clean"]', '["total"]', '["tabulate"]']
    records = run_spec(project, spec, "second")
    messages = [record["message"] for record in records]
    assert messages.count("step served from the cache: its nodes do not run") == 3
    assert "node started" not in messages
    assert table(project) == first

    # Gone between the plan and the run: the cache-serve step runs that step itself.
    made, spec = run_once(project, vertex, "--cache", "on")
    assert tasks_of(spec) == {"cache-serve": ["clean", "total", "tabulate"]}
    entry_of(project, "total").unlink()
    records = run_spec(project, spec, "third")
    warned = [record for record in records
              if record["message"] == "a step planned as served from the step cache cannot be served here: it runs"]
    assert [record["step"] for record in warned] == ["total"]
    assert [record["node"] for record in records if record["message"] == "node started"] == ["total"]
    assert table(project) == first
    assert entry_of(project, "total").exists()  # recorded again by the step that ran


def test_a_step_upstream_of_which_one_misses_is_left_in_the_run_and_checks_the_cache_itself(
        project: Path, vertex: FakeVertex) -> None:
    run_local(project, "first", "--cache", "on")
    first = table(project)
    entry_of(project, "total").unlink()

    made, spec = run_once(project, vertex, "--cache", "on")
    assert "Step cache: 2 of 3 steps found" in made.stdout
    # tabulate hits, but waits for total, which runs: it stays a step of its own.
    assert tasks_of(spec) == {"cache-serve": ["clean"], "total": ["total"], "tabulate": ["tabulate"]}
    assert all(flag_values(argv, "--cache") == ["on"] for argv in argv_of(spec).values())
    run_spec(project, spec, "second")
    outcome = run_local(project, "third", "--cache", "on")
    assert set(outcome.values()) == {"served"}
    assert table(project) == first


def test_without_the_cache_every_step_is_submitted(project: Path, vertex: FakeVertex) -> None:
    run_local(project, "first", "--cache", "on")
    made, spec = run_once(project, vertex)
    assert "Step cache" not in made.stdout
    assert tasks_of(spec) == {"clean": ["clean"], "total": ["total"], "tabulate": ["tabulate"]}


#: Moves the entries a run recorded here to the keys the same steps compute in another
#: environment (``image-env``), as if they had run in an image: argv project, storage root.
RECORD_ELSEWHERE = """
import json, sys
from pathlib import Path
from kedro.framework.project import pipelines, settings
from kedro.framework.session import KedroSession
from kedro.framework.startup import bootstrap_project
from kvx_runtime.cache.key import key_context_of, step_keys
from kvx_runtime.cache.store import StepCache
from kvx_runtime.config_loader import exported_storage_root
from kvx_runtime.project import disable_plugin_hooks, entry_points_of_disabled_plugins_not_loaded

project, root = Path(sys.argv[1]), sys.argv[2]
metadata = bootstrap_project(project)
disable_plugin_hooks(settings, ("kedro-mlflow", "kedro_mlflow"))
with entry_points_of_disabled_plugins_not_loaded(settings):
    session = KedroSession.create(project, env="base")
cache = StepCache(root)
with session, exported_storage_root(root):
    pipeline = pipelines["__default__"]
    steps = {node.name: [node.name] for node in pipeline.nodes}
    keys = step_keys(key_context_of(session.load_context(), pipeline, steps, package_name=metadata.package_name,
                                    environment="image-env"))
    for step, key in keys.items():
        here = cache.last_key(step)
        Path(cache.url(here.key).removeprefix("file://")).unlink()
        cache.record(key, nodes=here.nodes, run_id="image-run", job_name="image-job",
                     outputs={name: output["location"] for name, output in here.outputs.items()})
"""


def test_entries_recorded_in_another_environment_are_predicted_and_checked_where_the_run_executes(
        project: Path, vertex: FakeVertex) -> None:
    run_local(project, "first", "--cache", "on")
    first = table(project)
    root = project / ".kvx" / "storage"
    environ = {key: value for key, value in os.environ.items() if not key.startswith("KEDRO")}
    environ["PYTHONPATH"] = os.pathsep.join([str(REPO), str(project / "src")])
    moved = subprocess.run([sys.executable, "-c", RECORD_ELSEWHERE, str(project), str(root)], cwd=project,
                           env=environ, capture_output=True, text=True, timeout=120)
    assert moved.returncode == 0, moved.stderr[-3000:]

    planned = subprocess.run([*KVX, "plan", "--storage-root", str(root)], cwd=project, env=step_env(),
                             capture_output=True, text=True, timeout=120)
    assert planned.returncode == 0, planned.stderr[-3000:]
    assert "in the environment of run image-run (where the steps ran, not here)" in planned.stdout
    assert "3 of 3 steps would be served" in planned.stdout

    made, spec = run_once(project, vertex, "--cache", "on")
    assert "3 of 3 steps found" in made.stdout and "in the environment run image-run recorded" in made.stdout
    assert tasks_of(spec) == {"cache-serve": ["clean", "total", "tabulate"]}
    # Here is not that environment: the cache-serve step finds no entry and runs every step.
    records = run_spec(project, spec, "second")
    assert [record["node"] for record in records if record["message"] == "node started"] == \
        ["clean", "total", "tabulate"]
    assert table(project) == first


def test_resume_runs_again_only_what_a_failed_run_did_not_finish_as_the_same_run(
        project: Path, vertex: FakeVertex) -> None:
    run_local(project, "plain")
    expected = table(project)
    (project / "data" / "table.csv").unlink()
    nodes = project / "src" / "cachekey" / "nodes.py"
    working = nodes.read_text()
    nodes.write_text(working.replace('    if label == "FAIL":', '    if True:'))

    _, spec = run_once(project, vertex, "--cache", "on")
    [job] = [name for name, created in vertex.jobs.items() if created["pipelineSpec"] is spec]
    job_id = job.rsplit("/", 1)[-1]
    path = project / "failed.json"
    path.write_text(json.dumps(spec))
    failed = subprocess.run([*KVX, "run-local", str(path), "--job-name", job_id], cwd=project, env=step_env(),
                            capture_output=True, text=True, timeout=300)
    assert failed.returncode == 1, failed.stdout[-2000:] + failed.stderr[-3000:]
    vertex.fail_tasks = {"tabulate"}
    env = step_env(KVX_VERTEX_ENDPOINT=vertex.url, GOOGLE_APPLICATION_CREDENTIALS=str(project.parent / "adc.json"))

    def kvx(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*KVX, *args], cwd=project, env=env, capture_output=True, text=True, timeout=300)

    running = kvx("resume", job_id)
    assert running.returncode == 2 and "only a run that ended can be resumed" in running.stderr
    for _ in range(3):  # the fake moves a job on at each read
        vertex._advance(vertex.jobs[job])
    assert vertex.jobs[job]["state"] == "PIPELINE_STATE_FAILED"
    vertex.fail_tasks = set()

    nodes.write_text(working)  # the fix
    info = vertex.jobs[job]["pipelineSpec"]["pipelineInfo"]
    info["name"], name = "another-project", info["name"]  # another project's job of the same id
    foreign = kvx("resume", job_id)
    assert foreign.returncode == 2 and f"ran pipeline another-project, not this project's {name}" in foreign.stderr
    info["name"] = name
    other_env = kvx("resume", "--env", "other", job_id)
    assert other_env.returncode == 2 and f"run {job_id} ran with env base, not other" in other_env.stderr
    before = set(vertex.jobs)
    resumed = kvx("resume", job_id)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    assert f"Resuming {job_id} as " in resumed.stdout and "2 finished nodes kept, 1 step to run" in resumed.stdout
    # Recorded in the job directory before the kept blobs were looked up: gc keeps the job
    # while its steps wait for machines (the refused resumes above wrote nothing there).
    activity = project / ".kvx" / "storage" / "kedro-vertexai-temp" / job_id / "activity"
    assert sorted(path.name for path in activity.iterdir()) == ["resume.json"]
    assert json.loads((activity / "resume.json").read_text())["who"] == "resume"
    (new,) = set(vertex.jobs) - before
    spec = vertex.jobs[new]["pipelineSpec"]
    assert tasks_of(spec) == {"tabulate": ["tabulate"]}
    argv = argv_of(spec)["tabulate"]
    assert flag_values(argv, "--job-name") == [job_id] and "{{$" not in flag_values(argv, "--run-id")[0]
    assert flag_values(argv, "--cache") == ["on"]  # as the run it resumes ran
    path.write_text(json.dumps(spec))
    finished = subprocess.run([*KVX, "run-local", str(path), "--job-name", "resumed"], cwd=project, env=step_env(),
                              capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stdout[-2000:] + finished.stderr[-3000:]
    log = project / ".kvx" / "runs" / "resumed" / "logs" / "tabulate.log"
    records = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    assert {record.get("run_id") for record in records if "run_id" in record} == \
        {flag_values(argv, "--run-id")[0]}  # the failed run's own id: it read that run's intermediates
    assert table(project) == expected

    # The resumed run fails too: resuming it keeps what the first run finished (the steps it
    # left out are not tasks of it), not only what it finished itself.
    vertex.fail_tasks = {"tabulate"}
    for _ in range(3):
        vertex._advance(vertex.jobs[new])
    assert vertex.jobs[new]["state"] == "PIPELINE_STATE_FAILED"
    vertex.fail_tasks = set()
    # What a finished step wrote is gone since (gc, a lifecycle rule): that step runs again, not
    # a step that would fail reading it.
    job_directory = project / ".kvx" / "storage" / "kedro-vertexai-temp" / job_id
    (job_directory / "total.bin").unlink()
    before = set(vertex.jobs)
    third = kvx("resume", new.rsplit("/", 1)[-1])
    assert third.returncode == 0, third.stdout[-2000:] + third.stderr[-3000:]
    assert f"1 finished step run again: what it wrote is gone from {job_directory} (total)" in third.stdout
    assert "1 finished node kept, 2 steps to run" in third.stdout
    (last,) = set(vertex.jobs) - before
    assert tasks_of(vertex.jobs[last]["pipelineSpec"]) == {"total": ["total"], "tabulate": ["tabulate"]}
    path.write_text(json.dumps(vertex.jobs[last]["pipelineSpec"]))
    finished = subprocess.run([*KVX, "run-local", str(path), "--job-name", "resumed-again"], cwd=project,
                              env=step_env(), capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stdout[-2000:] + finished.stderr[-3000:]
    assert (job_directory / "total.bin").exists() and table(project) == expected
    for _ in range(3):
        vertex._advance(vertex.jobs[last])
    assert vertex.jobs[last]["state"] == "PIPELINE_STATE_SUCCEEDED"
    again = kvx("resume", last.rsplit("/", 1)[-1])
    assert again.returncode == 2 and "succeeded: nothing to resume" in again.stderr


def test_resume_on_kubeflow_submits_the_unfinished_steps_as_the_same_run(project: Path) -> None:
    from integration.fake_kfp import BEARER_TOKEN, FakeKfp, split_pipeline_spec

    kfp = FakeKfp(auth="bearer").start()
    try:
        config = project / "conf" / "base" / "vertexai.yml"
        config.write_text(config.read_text().replace("run_config:\n", "run_config:\n  namespace: team-a\n")
                          + f"host: {kfp.url}\n")
        env = step_env(KF_PIPELINES_TOKEN=BEARER_TOKEN, KVX_WATCH_INTERVAL="0.05", KVX_API_RETRY_WAIT="0.05")

        def kvx(*args: str) -> subprocess.CompletedProcess:
            return subprocess.run([*KVX, "kfp", *args], cwd=project, env=env, capture_output=True, text=True,
                                  timeout=300)

        kfp.fail_tasks = {"total"}
        failed = kvx("run-once", "--wait", "--storage-root", str(project / ".kvx" / "storage"),
                     "--param", "factor=3")
        assert failed.returncode == 1, failed.stdout[-2000:] + failed.stderr[-3000:]
        [old] = kfp.runs.values()
        kfp.fail_tasks = set()
        # The fake runs no container: what the finished step (clean) wrote is put where it would be.
        job_directory = project / ".kvx" / "storage" / "kedro-vertexai-temp" / f"{old['display_name']}-{old['run_id']}"
        job_directory.mkdir(parents=True)
        (job_directory / "cleaned.bin").write_bytes(b"written by the finished step")
        resumed = kvx("resume", old["run_id"])
        assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
        # The fake reports tabulate succeeded after total failed: it runs again all the same (it
        # would read what total writes now).
        assert "1 finished node kept, 2 steps to run" in resumed.stdout, resumed.stdout
        [new] = [run for run in kfp.runs.values() if run["run_id"] != old["run_id"]]
        spec = split_pipeline_spec(new["pipeline_spec"])[0]
        assert tasks_of(spec) == {"total": ["total"], "tabulate": ["tabulate"]}
        argv = argv_of(spec)["total"]
        # The failed run's identity, literally: KFP's run id, the job directory KFP's steps used.
        assert flag_values(argv, "--run-id") == [old["run_id"]]
        assert flag_values(argv, "--job-name") == [f"{old['display_name']}-{old['run_id']}"]
        assert new["runtime_config"]["parameters"]["factor"] == old["runtime_config"]["parameters"]["factor"] == 3
        assert kfp.problems == []
    finally:
        kfp.stop()


def test_with_uploaded_code_the_keys_count_the_archive_the_steps_will_run(project: Path, vertex: FakeVertex) -> None:
    assert set(run_local(project, "first", "--cache", "on", "--code-upload").values()) == {"ran"}
    first = table(project)

    made, spec = run_once(project, vertex, "--cache", "on", "--code-upload")
    assert "Step cache: 3 of 3 steps found" in made.stdout
    argv = argv_of(spec)["cache-serve"]
    assert len(flag_values(argv, "--code")) == 1 and "#sha256=" in flag_values(argv, "--code")[0]
    records = run_spec(project, spec, "second")
    assert [record["message"] for record in records].count("step served from the cache: its nodes do not run") == 3
    assert table(project) == first

    # Another archive (a code change no key part sees: a comment): no entry has its digest.
    helpers = project / "src" / "cachekey" / "helpers.py"
    helpers.write_text(helpers.read_text() + "# a comment\n")
    made, spec = run_once(project, vertex, "--cache", "on", "--code-upload")
    assert "none of the 3 steps found" in made.stdout
