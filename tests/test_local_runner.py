"""run-local on small hand-made specs whose steps are tiny Python processes: placeholder
substitution, dependency order, parallelism, retries, trigger policies, failure reports."""

from __future__ import annotations

import io
import json
import shutil
import sys
from pathlib import Path

import pytest

from kvx_runtime.compiler.spec import (
    FINAL_STATUS,
    PipelineParameter,
    SpecBuilder,
    Step,
    output_file,
    placeholder,
)
from kvx_runtime.errors import UsageError
from kvx_runtime.local_runner import parse_overrides, run_local

PY = sys.executable

# Appends "<name> start|end <monotonic ns>" to events.log, sleeps, optionally fails.
STEP = """
import os, sys, time, pathlib
name, sleep, fail_times = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
log = pathlib.Path("events.log")
with log.open("a") as f: f.write(f"{name} start {time.monotonic_ns()}\\n")
time.sleep(sleep)
attempts = pathlib.Path(f"attempts-{name}")
count = int(attempts.read_text()) + 1 if attempts.exists() else 1
attempts.write_text(str(count))
with log.open("a") as f: f.write(f"{name} end {time.monotonic_ns()}\\n")
if count <= fail_times:
    print('{"severity": "ERROR", "message": "step ' + name + ' broke on purpose"}', file=sys.stderr)
    sys.exit(3)
"""


def step(task: str, *, deps=(), sleep=0.0, fail_times=0, retry=None, **extra) -> Step:
    return Step(task=task, display_name=task, command=[PY, "-c", STEP],
                args=[task, str(sleep), str(fail_times)], depends_on=list(deps), retry=retry, **extra)


def build(steps, exit_steps=(), parameters=(), start=None) -> dict:
    builder = SpecBuilder(name="test-pipe", description=None, image="img", storage_root="/unused",
                          parameters=list(parameters), mlflow=False, has_exit_handler=bool(exit_steps))
    return builder.build(list(steps), start, list(exit_steps))


def events(project: Path) -> list[tuple[str, str, int]]:
    lines = (project / "events.log").read_text().split("\n")
    return [(a, b, int(c)) for a, b, c in (line.split() for line in lines if line)]


def run(spec, project, **kwargs):
    out = io.StringIO()
    result = run_local(spec, project, stream=out, **kwargs)
    return result, out.getvalue()


def test_dependencies_are_respected(tmp_path: Path) -> None:
    spec = build([step("a"), step("b", deps=["a"]), step("c", deps=["a"]), step("d", deps=["b", "c"])])
    result, _ = run(spec, tmp_path, max_parallel=4)
    assert result.exit_code == 0
    order = [(n, e) for n, e, _ in events(tmp_path)]
    position = {item: i for i, item in enumerate(order)}
    assert position[("a", "end")] < position[("b", "start")]
    assert position[("a", "end")] < position[("c", "start")]
    assert position[("b", "end")] < position[("d", "start")] and position[("c", "end")] < position[("d", "start")]


def _overlap(log, x: str, y: str) -> bool:
    times = {(n, e): t for n, e, t in log}
    return times[(x, "start")] < times[(y, "end")] and times[(y, "start")] < times[(x, "end")]


def test_runs_started_in_the_same_second_without_a_job_name_get_a_name_each(tmp_path: Path, monkeypatch) -> None:
    import concurrent.futures

    from kvx_runtime.local_runner import runner

    monkeypatch.setattr(runner, "default_job_name", lambda spec: "test-pipe-20261203120000")  # one second for all
    spec = build([step("a")])
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        names = list(pool.map(lambda _: runner.claim_default_job_name(spec, tmp_path), range(4)))
    base = "test-pipe-20261203120000"
    assert sorted(names) == sorted([base, f"{base}-2", f"{base}-3", f"{base}-4"])
    assert all((tmp_path / ".kvx" / "runs" / name).is_dir() for name in names)
    result, _ = run(spec, tmp_path)  # a run without a name takes the next one
    assert result.job_name == f"{base}-5" and result.exit_code == 0


def test_independent_steps_run_in_parallel_up_to_the_limit(tmp_path: Path) -> None:
    spec = build([step("a", sleep=1.0), step("b", sleep=1.0), step("c", sleep=1.0)])
    (tmp_path / "two").mkdir()
    result, _ = run(spec, tmp_path / "two", max_parallel=2)
    assert result.exit_code == 0
    log = events(tmp_path / "two")
    first_two = [n for n, e, _ in log if e == "start"][:2]
    assert _overlap(log, *first_two)

    (tmp_path / "one").mkdir()
    result, _ = run(spec, tmp_path / "one", max_parallel=1)
    log = events(tmp_path / "one")
    assert not _overlap(log, "a", "b") and not _overlap(log, "b", "c") and not _overlap(log, "a", "c")


def test_retry_policy_reruns_a_failing_step(tmp_path: Path) -> None:
    retry = {"backoffDuration": "0s", "backoffFactor": 2.0, "backoffMaxDuration": "1s", "maxRetryCount": 2}
    spec = build([step("flaky", fail_times=2, retry=retry), step("after", deps=["flaky"])])
    result, output = run(spec, tmp_path)
    assert result.exit_code == 0
    assert (tmp_path / "attempts-flaky").read_text() == "3"
    assert "retrying  flaky" in output


def test_exhausted_retries_fail_with_the_steps_exit_code(tmp_path: Path) -> None:
    retry = {"backoffDuration": "0s", "maxRetryCount": 1}
    spec = build([step("bad", fail_times=5, retry=retry)])
    result, _ = run(spec, tmp_path)
    assert result.exit_code == 3
    assert (tmp_path / "attempts-bad").read_text() == "2"


def status_writer(path: Path) -> Step:
    """An exit-handler step that writes the final status it receives to ``path``."""
    return Step(
        task="on-exit", display_name="on-exit", command=[PY, "-c",
        "import sys, pathlib; pathlib.Path(sys.argv[1]).write_text(sys.argv[2])"],
        args=[str(path), placeholder(FINAL_STATUS)],
        inputs={FINAL_STATUS: "TASK_FINAL_STATUS"}, depends_on=["exit-handler-1"], final_status=True,
    )


def test_after_a_failure_independent_steps_finish_as_on_vertex(tmp_path: Path) -> None:
    status_file = tmp_path / "final_status.json"
    exit_step = status_writer(status_file)
    # "side" does not depend on "b": Vertex AI's default policy (fail_slow) still runs it,
    # after "b" failed (max_parallel=1 and the order b, c, side).
    spec = build([step("a"), step("b", deps=["a"], fail_times=1), step("c", deps=["b"]),
                  step("side", deps=["a"], sleep=0.5), step("late", deps=["side"], fail_times=1)],
                 exit_steps=[exit_step])
    result, output = run(spec, tmp_path, max_parallel=1, job_name="job-x")
    assert result.exit_code == 3
    assert result.failed_task == "b" and result.failed_tasks == ["b", "late"]
    assert result.states == {"a": "done", "b": "failed", "c": "skipped", "side": "done", "late": "failed",
                             "on-exit": "done"}
    status = json.loads(status_file.read_text())
    assert status["state"] == "FAILED"
    assert "step b broke on purpose" in status["error"]["message"]
    assert status["pipelineJobResourceName"].endswith("/pipelineJobs/job-x")
    # Per failed step: the error line, the log, the replay; no log dump.
    report = output.split("2 steps failed, 1 skipped:")[1]
    assert "  b: exit 3: step b broke on purpose" in report
    assert "  late: exit 3: step late broke on purpose" in report
    assert f"log:    {tmp_path / '.kvx' / 'runs' / 'job-x' / 'logs' / 'b.log'}" in report
    assert f"replay: cd {tmp_path}" in report
    assert "--- attempt" not in output  # no log dump
    assert sum(line.startswith("    log:") for line in report.splitlines()) == 2
    persisted = json.loads((tmp_path / ".kvx" / "runs" / "job-x" / "status.json").read_text())
    assert persisted["failed_task"] == "b"


def test_fail_fast_starts_nothing_new(tmp_path: Path) -> None:
    spec = build([step("a"), step("b", deps=["a"], fail_times=1), step("side", deps=["a"], sleep=0.2)])
    result, output = run(spec, tmp_path, max_parallel=1, fail_fast=True)
    assert result.states == {"a": "done", "b": "failed", "side": "skipped"}
    assert "fail_fast" in output.splitlines()[0]
    assert "skipped   side (fail_fast: step b failed)" in output  # its upstream did not fail


def test_the_specs_failure_policy_is_applied(tmp_path: Path) -> None:
    spec = build([step("a", fail_times=1), step("b", sleep=0.2)])
    spec["root"]["inputDefinitions"]["parameters"]["kvx_failure_policy"]["defaultValue"] = "fail_fast"
    result, _ = run(spec, tmp_path, max_parallel=1)
    assert result.states == {"a": "failed", "b": "skipped"}
    (tmp_path / "slow").mkdir()
    result, _ = run(spec, tmp_path / "slow", max_parallel=1, params={"kvx_failure_policy": "fail_slow"})
    assert result.states == {"a": "failed", "b": "done"}
    with pytest.raises(UsageError, match="kvx_failure_policy 'sometimes'"):
        run(spec, tmp_path, params={"kvx_failure_policy": "sometimes"})


def test_exit_handler_sees_success(tmp_path: Path) -> None:
    status_file = tmp_path / "status.json"
    result, _ = run(build([step("a")], exit_steps=[status_writer(status_file)]), tmp_path)
    assert result.exit_code == 0
    assert json.loads(status_file.read_text())["state"] == "SUCCEEDED"


def test_placeholders_parameters_and_output_files(tmp_path: Path) -> None:
    echo = ("import json, sys, pathlib; pathlib.Path('seen.json').write_text(json.dumps(sys.argv[1:]));"
            "pathlib.Path(sys.argv[-1]).write_text('out-value')")
    producer = Step(
        task="produce", display_name="produce", command=[PY, "-c", echo],
        args=["{{$.pipeline_job_name}}", "{{$.pipeline_job_uuid}}", "{{$.pipeline_task_name}}",
              placeholder("kvx_storage_root"), "n={{$.inputs.parameters['n']}}",
              placeholder("flags"), placeholder("ratio"), output_file("result")],
        inputs={"kvx_storage_root": "STRING", "n": "NUMBER_INTEGER", "flags": "LIST", "ratio": "NUMBER_DOUBLE"},
        outputs={"result": "STRING"},
    )
    consume = Step(
        task="consume", display_name="consume", command=[PY, "-c",
        "import sys, pathlib; pathlib.Path('consumed').write_text(sys.argv[1])"],
        args=[placeholder("mlflow_run_id")], inputs={"mlflow_run_id": "STRING"}, depends_on=["produce"],
    )
    params = [PipelineParameter("n", "n", "int", 10.0), PipelineParameter("flags", "flags", "list", ["a"]),
              PipelineParameter("ratio", "ratio", "float", 0.5)]
    spec = build([consume], parameters=params, start=producer)
    # Route consume's input to produce's output, as mlflow-start-run -> steps.
    spec["root"]["dag"]["tasks"]["consume"]["inputs"]["parameters"]["mlflow_run_id"] = {
        "taskOutputParameter": {"outputParameterKey": "result", "producerTask": "produce"}}
    result, _ = run(spec, tmp_path, job_name="job-1", params=parse_overrides(["ratio=0.25"]))
    assert result.exit_code == 0, (tmp_path / ".kvx/runs/job-1/logs/produce.log").read_text()
    seen = json.loads((tmp_path / "seen.json").read_text())
    assert seen[0] == "job-1" and len(seen[1]) == 36 and seen[2] == "produce"
    assert seen[3] == str(tmp_path / ".kvx" / "storage")  # default local storage root
    assert seen[4] == "n=10" and seen[5] == '["a"]' and seen[6] == "0.25"
    assert (tmp_path / "consumed").read_text() == "out-value"
    assert result.outputs["produce"] == {"result": "out-value"}


def test_unknown_or_mistyped_parameter_overrides_are_usage_errors(tmp_path: Path) -> None:
    spec = build([step("a")], parameters=[PipelineParameter("n", "n", "int", 1)])
    with pytest.raises(UsageError, match="unknown pipeline parameter"):
        run(spec, tmp_path, params={"m": "1"})
    with pytest.raises(UsageError, match="not a valid NUMBER_INTEGER"):
        run(spec, tmp_path, params={"n": "1.5"})


def test_dotted_kedro_names_map_to_pipeline_parameters() -> None:
    assert parse_overrides(["model.lr=0.1", "seed=3"]) == {"model__lr": "0.1", "seed": "3"}


# Leaves a file on its "disk" and fails if it finds one an earlier step left, or lacks the code.
DISK = """
import pathlib, sys
here = pathlib.Path.cwd()
leftovers = sorted(p.name for p in here.glob("leftover-*"))
if leftovers or not (here / "src" / "pkg" / "nodes.py").is_file() or (here / "data" / "02_intermediate").exists():
    print('{"severity": "ERROR", "message": "not a fresh copy: ' + " ".join(leftovers) + '"}', file=sys.stderr)
    sys.exit(1)
(here / f"leftover-{sys.argv[1]}").write_text("x")
"""


def test_fresh_copies_give_each_step_an_empty_disk_with_the_images_files(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text("[tool.kedro]\npackage_name = 'pkg'\n")
    (tmp_path / "src" / "pkg").mkdir(parents=True)
    (tmp_path / "src" / "pkg" / "nodes.py").write_text("")
    (tmp_path / "data" / "02_intermediate").mkdir(parents=True)
    (tmp_path / "data" / "02_intermediate" / "stale.csv").write_text("a\n")  # the template leaves data out
    steps = [Step(task=name, display_name=name, command=[PY, "-c", DISK], args=[name], depends_on=deps)
             for name, deps in (("first", []), ("second", ["first"]))]
    spec = build(steps)
    result, out = run(spec, tmp_path, job_name="fresh", fresh_copies=True)
    copies = tmp_path / ".kvx" / "runs" / "fresh" / "copies"
    assert result.exit_code == 0, (tmp_path / ".kvx/runs/fresh/logs/second.log").read_text()
    assert sorted(p.name for p in (copies / "second").glob("leftover-*")) == ["leftover-second"]
    assert "each step in a fresh copy" in out
    # The same steps in the project itself (one disk for all): the second finds the first's file.
    shutil.rmtree(tmp_path / "data")
    shared, _ = run(spec, tmp_path, job_name="shared")
    assert shared.exit_code == 1 and shared.failed_task == "second"
    assert shared.replay is not None and shared.replay.startswith(f"cd {tmp_path} && ")
    # What the image would not hold stays out of the copies (the template keeps only code, conf, raw data).
    again, _ = run(spec, tmp_path, job_name="again", fresh_copies=True)
    assert again.exit_code == 0 and (tmp_path / "leftover-first").exists()


def test_a_run_local_that_fails_before_it_starts_leaves_no_run_directory(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from kvx_runtime.cli import cli

    spec = tmp_path / "pipeline.json"
    spec.write_text(json.dumps(build([step("a")], parameters=[PipelineParameter("n", "n", "int", 1)])))
    result = CliRunner().invoke(cli, ["run-local", str(spec), "--project-path", str(tmp_path),
                                      "--storage-root", str(tmp_path / "root"), "--param", "m=1"])
    assert result.exit_code == 2 and "unknown pipeline parameter" in result.output
    assert list((tmp_path / ".kvx" / "runs").iterdir()) == []  # the claimed name was given back


def test_a_claimed_name_is_given_back_only_while_its_run_directory_is_empty(tmp_path: Path) -> None:
    from kvx_runtime.local_runner import runner

    spec = build([step("a")])
    name = runner.claim_default_job_name(spec, tmp_path)
    runner.release_job_name(tmp_path, name)
    assert runner.claim_default_job_name(spec, tmp_path) == name  # the same name again
    (runner.run_directory(tmp_path, name) / "logs").mkdir()
    runner.release_job_name(tmp_path, name)
    assert runner.run_directory(tmp_path, name).is_dir()


def test_the_command_shown_masks_secret_named_parameters_the_one_run_keeps_them() -> None:
    # The shown command goes into the step's log header and the replay line: files and output
    # that are not the secret's target.
    from kvx_runtime.local_runner.runner import _command

    container = {"command": ["kvx-runtime"], "args": ["exec-node", "--param", "api_key={{$.inputs.parameters['k']}}",
                                                      "--param", "n=1"]}
    argv, shown = _command(container, {"inputs.parameters['k']": "s3cr3t-kvx"})
    assert argv[-3:] == ["api_key=s3cr3t-kvx", "--param", "n=1"]
    assert shown == ["kvx-runtime", "exec-node", "--param", "api_key=[redacted]", "--param", "n=1"]
