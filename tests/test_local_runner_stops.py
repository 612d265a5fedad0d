"""run-local leaves nothing running behind it and keeps a job one run: a step that will not stop
is killed, a step that cannot start fails alone, a reader that goes away does not stop the run,
a job name is not reused, and a resume is refused unless it is the same run (its pipeline, its
steps, its values)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from kvx_runtime.compiler.spec import FINAL_STATUS, PipelineParameter, SpecBuilder, Step, placeholder
from kvx_runtime.errors import Interrupted, UsageError
from kvx_runtime.local_runner import run_local, runner

PY = sys.executable
#: Writes its pid to <name>.pid, ignores SIGTERM, sleeps: a step that will not stop.
STUBBORN = "import os, signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); " \
           "open(sys.argv[1] + '.pid', 'w').write(str(os.getpid())); time.sleep(60)"
QUICK = "import pathlib, sys; pathlib.Path(sys.argv[1] + '.done').write_text('x')"
EXIT_HANDLER = "import json, pathlib, sys; " \
               "pathlib.Path(sys.argv[1] + '.done').write_text(json.loads(sys.argv[2])['state'])"


def build(steps: list[Step], exit_steps: list[Step] | None = None, name: str = "test-pipe",
          parameters: list[PipelineParameter] | None = None) -> dict:
    builder = SpecBuilder(name=name, description=None, image="img", storage_root="/unused",
                          parameters=list(parameters or []), mlflow=False, has_exit_handler=bool(exit_steps))
    return builder.build(steps, None, list(exit_steps or []))


def step(task: str, code: str = QUICK, *, command: list[str] | None = None, deps: tuple[str, ...] = ()) -> Step:
    return Step(task=task, display_name=task, command=command or [PY, "-c", code], args=[task],
                depends_on=list(deps))


def exit_step(task: str) -> Step:
    """An exit handler writing the final status it receives to <task>.done."""
    return Step(task=task, display_name=task, command=[PY, "-c", EXIT_HANDLER],
                args=[task, placeholder(FINAL_STATUS)], inputs={FINAL_STATUS: "TASK_FINAL_STATUS"},
                depends_on=["exit-handler-1"], final_status=True)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (reaped later by init) is gone for our purposes
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def wait_for(path: Path, seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


class Stops:
    """A progress stream that raises ``error`` once the line naming ``trigger`` is written."""

    def __init__(self, trigger: str, error: BaseException, project: Path, wait_file: str) -> None:
        self.trigger, self.error, self.project, self.wait_file = trigger, error, project, wait_file
        self.text = io.StringIO()
        self.raised = False

    def write(self, text: str) -> int:
        self.text.write(text)
        if not self.raised and self.trigger in text:
            self.raised = True
            wait_for(self.project / self.wait_file)
            raise self.error
        return len(text)

    def flush(self) -> None:
        return None

    def isatty(self) -> bool:
        return False


@pytest.mark.parametrize("error", [Interrupted(signal.SIGTERM), RuntimeError("the runner broke")],
                         ids=["stop signal", "internal error"])
def test_a_step_that_will_not_stop_is_killed_and_the_status_says_what_happened(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: BaseException) -> None:
    monkeypatch.setattr(runner, "STOP_GRACE_SECONDS", 0.5)
    spec = build([step("stubborn", STUBBORN), step("later", deps=("stubborn",))],
                 exit_steps=[exit_step("onexit")])
    stream = Stops("started   stubborn", error, tmp_path, "stubborn.pid")
    with pytest.raises(type(error)):
        run_local(spec, tmp_path, stream=stream, job_name="j")  # type: ignore[arg-type]
    pid = int((tmp_path / "stubborn.pid").read_text())
    assert not alive(pid)
    status = json.loads((tmp_path / ".kvx" / "runs" / "j" / "status.json").read_text())
    assert status["states"] == {"stubborn": "cancelled", "later": "skipped", "onexit": "done"}
    assert status["exit_codes"]["stubborn"] == 128 + signal.SIGKILL
    assert (tmp_path / "onexit.done").read_text() == "CANCELLED"  # the exit handler ran, as on Vertex AI


def test_a_step_whose_program_cannot_start_fails_alone_with_a_shells_code(tmp_path: Path) -> None:
    spec = build([step("missing", command=["no-such-program-kvx"]), step("fine")])
    out = io.StringIO()
    result = run_local(spec, tmp_path, stream=out, job_name="j")
    assert result.exit_code == 127 and result.failed_task == "missing"
    assert result.states == {"missing": "failed", "fine": "done"}
    log = (tmp_path / ".kvx" / "runs" / "j" / "logs" / "missing.log").read_text()
    assert "cannot start no-such-program-kvx: No such file or directory" in log


def test_a_reader_that_goes_away_does_not_stop_the_run(tmp_path: Path) -> None:
    class Closed(io.StringIO):
        def write(self, text: str) -> int:
            raise BrokenPipeError(32, "Broken pipe")

    result = run_local(build([step("a"), step("b", deps=("a",))]), tmp_path, stream=Closed(), job_name="j")
    assert result.exit_code == 0 and (tmp_path / "b.done").exists()


def test_a_second_stop_signal_ends_what_must_not_outlive_the_process(tmp_path: Path) -> None:
    marker = tmp_path / "ended"
    script = textwrap.dedent(f"""
        import os, signal, time
        from pathlib import Path
        from kvx_runtime import lifecycle
        from kvx_runtime.errors import Interrupted
        lifecycle.install()
        with lifecycle.on_abrupt_exit(lambda: Path({str(marker)!r}).write_text("x")):
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)
            except Interrupted:
                os.kill(os.getpid(), signal.SIGHUP)  # the second one, while cleaning up
                time.sleep(5)
    """)
    made = subprocess.run([PY, "-c", script], capture_output=True, text=True, timeout=60)
    assert made.returncode == 143, made.stderr
    assert marker.exists()


def test_sighup_stops_a_command_as_sigterm_does(tmp_path: Path) -> None:
    script = textwrap.dedent("""
        import os, signal, sys
        from kvx_runtime import lifecycle
        from kvx_runtime.errors import Interrupted
        lifecycle.install()
        try:
            os.kill(os.getpid(), signal.SIGHUP)
        except Interrupted as stop:
            print(stop, stop.exit_code.value)
            lifecycle.finish(int(stop.exit_code))
    """)
    made = subprocess.run([PY, "-c", script], capture_output=True, text=True, timeout=60)
    assert made.returncode == 143 and made.stdout.strip() == "stopped by SIGHUP 143"


def test_a_job_name_is_one_run_and_one_run_local_at_a_time(tmp_path: Path) -> None:
    spec = build([step("a")])
    assert runner.claim_job(tmp_path, "mine", spec, resume=False) == "mine"
    assert runner.claim_job(tmp_path, "mine", spec, resume=False) == "mine"  # still empty: nothing ran
    (runner.run_directory(tmp_path, "mine") / "status.json").write_text("{}")
    with pytest.raises(UsageError, match="job mine has run already") as refused:
        runner.claim_job(tmp_path, "mine", spec, resume=False)
    assert "--resume mine" in (refused.value.hint or "")
    assert runner.claim_job(tmp_path, "mine", spec, resume=True) == "mine"
    with runner.job_held(tmp_path, "mine"), \
            pytest.raises(UsageError, match="job mine is running in another run-local"), \
            runner.job_held(tmp_path, "mine"):
        pass
    with runner.job_held(tmp_path, "mine"):  # held no more
        pass


def _failed_job(tmp_path: Path, parameters: list[PipelineParameter], params: dict[str, str]) -> dict:
    fails = "import sys; sys.exit(1)"
    spec = build([step("a"), step("b", fails, deps=("a",))], parameters=parameters)
    result = run_local(spec, tmp_path, stream=io.StringIO(), job_name="j", params=params)
    assert result.exit_code == 1
    return spec


def test_a_resume_must_be_the_same_run_pipeline_steps_and_values(tmp_path: Path) -> None:
    parameters = [PipelineParameter("title", "title", "str", "plain"),
                  PipelineParameter("api_token", "api_token", "str", "")]
    spec = _failed_job(tmp_path, parameters, {"title": "custom", "api_token": "s3cr3t-kvx"})
    status_file = tmp_path / ".kvx" / "runs" / "j" / "status.json"
    status = json.loads(status_file.read_text())
    assert status["pipeline"] == "test-pipe" and status["tasks"] == ["a", "b"]
    assert status["params"]["title"] == {"value": "custom"}
    assert "s3cr3t-kvx" not in status_file.read_text()  # a secret's value is kept by its digest only

    def resume(made: dict, **params: str) -> None:
        run_local(made, tmp_path, stream=io.StringIO(), job_name="j", params=params, resume=True)

    with pytest.raises(UsageError, match="job j ran pipeline test-pipe, not other-pipe"):
        resume(build([step("a"), step("b", deps=("a",))], name="other-pipe", parameters=parameters))
    with pytest.raises(UsageError, match=r"job j ran other steps than this spec has \(c\)"):
        resume(build([step("a"), step("b", deps=("a",)), step("c")], parameters=parameters))
    with pytest.raises(UsageError, match="--param api_token must be given again"):
        resume(spec)
    with pytest.raises(UsageError, match="--param title: job j ran with another value"):
        resume(spec, title="other", api_token="s3cr3t-kvx")
    with pytest.raises(UsageError, match="--param api_token: not the value job j ran with"):
        resume(spec, api_token="guess")

    # The same run: its values kept (title "custom" without --param), b runs again, a is kept.
    (tmp_path / "a.done").unlink()
    fixed = build([step("a"), step("b", deps=("a",))], parameters=parameters)
    result = run_local(fixed, tmp_path, stream=io.StringIO(), job_name="j", params={"api_token": "s3cr3t-kvx"},
                       resume=True)
    assert result.exit_code == 0 and not (tmp_path / "a.done").exists() and (tmp_path / "b.done").exists()
    assert json.loads(status_file.read_text())["params"]["title"] == {"value": "custom"}


def test_a_secrets_digest_in_the_status_is_salted_by_the_run() -> None:
    assert runner._secret_digest("s3cr3t-kvx", "run-1") != runner._secret_digest("s3cr3t-kvx", "run-2")
    assert runner._secret_digest("s3cr3t-kvx", "run-1") != hashlib.sha256(b"s3cr3t-kvx").hexdigest()
