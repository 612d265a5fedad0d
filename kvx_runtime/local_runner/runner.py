"""``run-local``: execute a compiled pipeline spec on this machine, as Vertex AI would.

Each task's container command runs as a subprocess in the project directory (no Docker),
with the spec's placeholders substituted as Vertex substitutes them, its env vars, its retry
policy and trigger policy. Independent tasks run in parallel (``max_parallel``). After a
failure, Vertex AI's default failure policy (fail_slow) lets every step that does not depend
on the failed one finish; fail_fast (the spec's ``kvx_failure_policy``, or ``--fail-fast``)
starts nothing new. Tasks that run regardless (exit handlers) receive the final status as
Vertex passes it. The report names each failed step with its error line, its log and the
exact command that replays it. With ``fresh_copies`` each step runs in a fresh copy of what the
project's image holds (``.kvx/runs/<job>/copies/<task>``): as on separate machines, nothing one
step leaves on its disk is there for another.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TextIO, cast

from kvx_runtime.compiler.kfp_reader import (
    SpecGraph,
    SpecTask,
    build_graph,
    describe_steps,
    input_key,
    output_key,
    render,
    spec_pipeline_name,
    substitute,
)
from kvx_runtime.compiler.spec import FAILURE_POLICIES, FAILURE_POLICY_PARAMETER, STORAGE_ROOT_PARAMETER
from kvx_runtime.config import LOCAL_STATE_DIR, local_storage_root
from kvx_runtime.dockerignore import image_files
from kvx_runtime.errors import ExitCode, UsageError
from kvx_runtime.lifecycle import held_across_exec, on_abrupt_exit
from kvx_runtime.local_runner.progress import make_progress
from kvx_runtime.log import get_logger

__all__ = ["LocalRunResult", "run_local"]

log = get_logger(__name__)

_POLL = 0.05
#: After a stop: how long running steps get to end on SIGTERM before they are killed.
STOP_GRACE_SECONDS = 30.0
#: How long an exit handler run after a stop gets before it is killed.
EXIT_HANDLER_SECONDS = 120.0
_KILLED_REAP_SECONDS = 5.0


@dataclass
class Attempt:
    task: str
    number: int
    process: subprocess.Popen
    log_path: Path
    argv: list[str]
    started: float


@dataclass
class LocalRunResult:
    job_name: str
    run_id: str
    run_dir: Path
    states: dict[str, str]
    exit_code: int
    #: The first step that failed (its exit code is the run's).
    failed_task: str | None = None
    replay: str | None = None
    outputs: dict[str, dict[str, str]] = field(default_factory=dict)
    #: Every failed step, in the order they failed.
    failed_tasks: list[str] = field(default_factory=list)


def _duration(text: str | None, default: float = 0.0) -> float:
    if not text:
        return default
    return float(str(text).rstrip("s"))


def _retry_wait(policy: Mapping[str, Any], attempt: int) -> float:
    base = _duration(policy.get("backoffDuration"))
    factor = float(policy.get("backoffFactor", 2.0))
    ceiling = _duration(policy.get("backoffMaxDuration"), default=3600.0)
    return float(min(base * factor ** (attempt - 1), ceiling))


def _command(container: Mapping[str, Any], values: Mapping[str, str]) -> tuple[list[str], list[str]]:
    """(argv to execute here, argv as the container would run it, to be shown: the values of
    secret-named parameters masked, as the step's log masks them)."""
    from kvx_runtime.params import items_shown

    command = [substitute(str(part), values) for part in [*container.get("command", []), *container.get("args", [])]]
    if not command:
        raise UsageError("a task has neither command nor args; local runs need an explicit command")
    argv = list(command)
    if argv[0] == "kvx-runtime":
        # The same program, from this interpreter (works without the venv on PATH).
        argv = [sys.executable, "-m", "kvx_runtime", *argv[1:]]
    shown = [items_shown([part])[0] if index and command[index - 1] == "--param" else part
             for index, part in enumerate(command)]
    return argv, shown


class _Scheduler:
    def __init__(
        self,
        graph: SpecGraph,
        project: Path,
        run_dir: Path,
        job_name: str,
        max_parallel: int,
        stream: TextIO,
        extra_env: Mapping[str, str],
        fail_fast: bool = False,
        fresh_copies: bool = False,
        run_id: str | None = None,
        served: Mapping[str, str] | None = None,
        resumed: Mapping[str, Any] | None = None,
    ) -> None:
        self.graph = graph
        self.fail_fast = fail_fast
        self.fresh_copies = fresh_copies
        self.project = project
        self.run_dir = run_dir
        self.job_name = job_name
        self.job_uuid = run_id or str(uuid.uuid4())
        # RFC 3339 with microseconds, the form Vertex AI fills {{$.pipeline_job_create_time_utc}} with.
        self.created = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        self.max_parallel = max(1, max_parallel)
        self.extra_env = dict(extra_env)
        self.states = dict.fromkeys(graph.tasks, "waiting")
        self.exit_codes: dict[str, int] = {}
        self.errors: dict[str, str] = {}
        self.outputs: dict[str, dict[str, str]] = {}
        self.attempts: dict[str, int] = {}
        self.not_before: dict[str, float] = {}
        self.running: dict[str, Attempt] = {}
        self.replays: dict[str, str] = {}
        self.failed_task: str | None = None
        self.failed_tasks: list[str] = []
        self.cancelled = False
        order = list(graph.tasks)
        self.progress = make_progress(order, stream)
        #: Steps the step cache served before the run: done, never started.
        self.served = dict(served or {})
        for task in self.served:
            self.states[task] = "done"
            self.outputs[task] = {}
        #: Steps an earlier run of this job finished (resume): done, with their outputs.
        self.kept: list[str] = []
        if resumed is not None:
            self.job_uuid = str(resumed["run_id"])
            self.created = str(resumed["created"])
            for task, state in resumed["states"].items():
                if state == "done" and task in self.states and not graph.tasks[task].run_after_failure:
                    self.states[task] = "done"
                    self.outputs[task] = dict(resumed.get("outputs", {}).get(task, {}))
                    self.kept.append(task)

    # --- readiness ----------------------------------------------------------------------

    def _finished(self, task: str) -> bool:
        return self.states[task] in {"done", "failed", "skipped", "cancelled"}

    def _ready(self, task: SpecTask) -> bool | None:
        """True: start now; False: not yet; None: can never run (skip)."""
        deps = task.depends_on
        if task.run_after_failure:  # exit handlers: once everything upstream has finished
            return all(self._finished(d) for d in deps)
        if any(self.states[d] in {"failed", "skipped", "cancelled"} for d in deps):
            return None
        if self.cancelled or (self.fail_fast and self.failed_task is not None):
            return None
        return all(self.states[d] == "done" for d in deps)

    def _skipped_because(self, task: SpecTask) -> str:
        if any(self.states[d] in {"failed", "skipped", "cancelled"} for d in task.depends_on):
            return "an upstream step failed"
        if self.cancelled:
            return "the run was interrupted"
        return f"fail_fast: step {self.failed_task} failed"

    def _group_state(self, group: str) -> tuple[str, str | None]:
        members = self.graph.groups.get(group, {group})
        states = [self.states[m] for m in members]
        if any(s == "failed" for s in states):
            failed = sorted(m for m in members if self.states[m] == "failed")
            return "FAILED", self.errors.get(failed[0])
        if any(s == "cancelled" for s in states) or self.cancelled:
            return "CANCELLED", "the run was interrupted"
        if all(s == "done" for s in states):
            return "SUCCEEDED", None
        return "FAILED", "upstream tasks did not run"

    # --- values -------------------------------------------------------------------------

    def _values(self, task: SpecTask) -> dict[str, str]:
        values = {
            "pipeline_job_name": self.job_name,
            "pipeline_job_uuid": self.job_uuid,
            "pipeline_job_create_time_utc": self.created,
            "pipeline_job_schedule_time_utc": self.created,
            "pipeline_task_name": task.display_name,
            "pipeline_task_uuid": str(uuid.uuid4()),
            "pipeline_root": str(self.run_dir / "pipeline_root"),
        }
        for name, source in task.inputs.items():
            kind = task.input_types.get(name, "STRING")
            if source.kind == "value":
                # Constants may themselves be placeholders (the job's create time), as on Vertex.
                values[input_key(name)] = substitute(render(kind, source.value), values)
            elif source.kind == "output":
                produced = self.outputs.get(source.producer or "", {})
                values[input_key(name)] = produced.get(source.key or "", "")
            else:
                state, message = self._group_state(source.producer or "")
                status: dict[str, Any] = {
                    "state": state,
                    "pipelineJobResourceName": f"projects/local/locations/local/pipelineJobs/{self.job_name}",
                    "pipelineTaskName": source.producer,
                }
                if message:
                    status["error"] = {"code": 9 if state == "FAILED" else 1, "message": message}
                values[input_key(name)] = json.dumps(status)
        out_dir = self.run_dir / "outputs" / task.name
        for name in task.output_names:
            values[output_key(name)] = str(out_dir / name)
        return values

    # --- lifecycle ----------------------------------------------------------------------

    def _start(self, task: SpecTask) -> None:
        number = self.attempts.get(task.name, 0) + 1
        self.attempts[task.name] = number
        values = self._values(task)
        argv, shown = _command(task.container, values)
        (self.run_dir / "outputs" / task.name).mkdir(parents=True, exist_ok=True)
        log_path = self.run_dir / "logs" / f"{task.name}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        container_env = {e["name"]: e.get("value", "") for e in task.container.get("env", [])}
        env = {**os.environ, **self.extra_env, **container_env}
        handle = log_path.open("ab")
        header = f"--- attempt {number}: {shlex.join(shown)}\n".encode()
        handle.write(header)
        handle.flush()
        # Our own program starts with the stop signals held until its handlers exist, so that a
        # cancel right after the start ends it with 143 too; anything else starts as usual.
        held = held_across_exec() if shown[0] == "kvx-runtime" else contextlib.nullcontext()
        started = time.monotonic()
        try:
            workdir = self._fresh_copy(task.name) if self.fresh_copies else self.project
            prefix = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(container_env.items()))
            self.replays[task.name] = (
                f"cd {shlex.quote(str(workdir))} && {prefix + ' ' if prefix else ''}{shlex.join(shown)}"
            )
            with held:  # a stop signal held here is delivered once the attempt is known to cancel()
                process = subprocess.Popen(
                    argv, cwd=workdir, env=env, stdout=handle, stderr=subprocess.STDOUT,
                    start_new_session=True,  # our Ctrl-C is forwarded deliberately, once
                )
                self.running[task.name] = Attempt(task.name, number, process, log_path, argv, started)
                self.states[task.name] = "running"
        except OSError as exc:  # the step's program cannot start (as a shell says: 127 not found, else 126)
            error = f"cannot start {shown[0]}: {exc.strerror or exc}"
            with contextlib.suppress(OSError):
                handle.write(f"{error}\n".encode())
            handle.close()
            self.progress.started_task(task.name, number)
            self._failed(task.name, 127 if isinstance(exc, FileNotFoundError) else 126, error, 0.0)
            return
        handle.close()
        self.progress.started_task(task.name, number)

    def _fresh_copy(self, task: str) -> Path:
        """A new copy of what the project's image holds, for one attempt of ``task`` (a retry
        starts on a fresh machine too)."""
        target = self.run_dir / "copies" / task
        if target.exists():
            shutil.rmtree(target)
        target.mkdir(parents=True)
        for relative in image_files(self.project, skip=(LOCAL_STATE_DIR,)):
            destination = target / relative
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(self.project / relative, destination)
        return target

    def _reap(self, attempt: Attempt) -> None:
        task = self.graph.tasks[attempt.task]
        code = attempt.process.returncode
        if code < 0:  # killed by a signal: report it as a shell would (128 + signal)
            code = 128 - code
        seconds = time.monotonic() - attempt.started
        del self.running[attempt.task]
        if code == 0:
            produced = {}
            for name in task.output_names:
                path = self.run_dir / "outputs" / task.name / name
                produced[name] = path.read_text().strip() if path.exists() else ""
            self.outputs[task.name] = produced
            self.states[task.name] = "done"
            self.progress.finished_task(task.name, "done", seconds)
            return
        policy = task.retry or {}
        if not self.cancelled and attempt.number <= int(policy.get("maxRetryCount", 0)):
            wait = _retry_wait(policy, attempt.number)
            self.not_before[task.name] = time.monotonic() + wait
            self.states[task.name] = "waiting"
            self.progress.retrying_task(task.name, wait, code)
            return
        self._failed(task.name, code, _last_error_line(attempt.log_path) or f"exit code {code}", seconds)

    def _failed(self, task: str, code: int, error: str, seconds: float) -> None:
        self.exit_codes[task] = code
        self.errors[task] = error
        state = "cancelled" if self.cancelled else "failed"
        self.states[task] = state
        self.progress.finished_task(task, state, seconds, f"(exit {code})")
        if state == "failed":
            self.failed_tasks.append(task)
            if self.failed_task is None:
                self.failed_task = task

    def cancel(self) -> None:
        self.cancelled = True
        self._signal_running(signal.SIGTERM)

    def kill_running(self) -> None:
        """SIGKILL every running step's process group (a step that does not stop on SIGTERM)."""
        self._signal_running(signal.SIGKILL)

    def _signal_running(self, signum: int) -> None:
        for attempt in list(self.running.values()):
            if attempt.process.poll() is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(attempt.process.pid, signum)

    def wait_running(self, seconds: float) -> None:
        """Reap the running steps as they end, for at most ``seconds``."""
        deadline = time.monotonic() + seconds
        while self.running and time.monotonic() < deadline:
            for attempt in list(self.running.values()):
                if attempt.process.poll() is not None:
                    self._reap(attempt)
            time.sleep(_POLL)

    def stop(self, grace: float) -> None:
        """Cancel the run: SIGTERM to the running steps, SIGKILL to those still running after
        ``grace`` seconds, every one reaped; steps that never started are skipped."""
        self.cancel()
        self.wait_running(grace)
        if self.running:
            self.kill_running()
            self.wait_running(_KILLED_REAP_SECONDS)
        for task, state in self.states.items():
            if state == "waiting" and not self.graph.tasks[task].run_after_failure:
                self.states[task] = "skipped"
                self.progress.skipped_task(task, "the run was interrupted")

    def run_exit_handlers(self, seconds: float) -> None:
        """The exit handlers that have not run, with a CANCELLED status as on Vertex AI, each
        given ``seconds`` before it is killed."""
        for task in self.graph.tasks.values():
            if task.run_after_failure and self.states[task.name] == "waiting":
                self._start(task)
                self.wait_running(seconds)
                if self.running:
                    self.kill_running()
                    self.wait_running(_KILLED_REAP_SECONDS)

    def run(self) -> None:
        with self.progress:
            for served, source in self.served.items():
                self.progress.finished_task(served, "done", 0.0, f"(served from the step cache: run {source})")
            for kept in self.kept:
                self.progress.finished_task(kept, "done", 0.0, "(done in the run resumed)")
            while True:
                for attempt in list(self.running.values()):
                    if attempt.process.poll() is not None:
                        self._reap(attempt)
                progressed = False
                for task in self.graph.tasks.values():
                    if self.states[task.name] != "waiting" or task.name in self.running:
                        continue
                    ready = self._ready(task)
                    if ready is None:
                        self.states[task.name] = "skipped"
                        self.progress.skipped_task(task.name, self._skipped_because(task))
                        progressed = True
                    elif (ready and len(self.running) < self.max_parallel
                          and time.monotonic() >= self.not_before.get(task.name, 0.0)):
                        self._start(task)
                        progressed = True
                if not self.running and all(self._finished(t) for t in self.graph.tasks):
                    break
                if not self.running and not progressed and not any(
                    self.states[t] == "waiting" and t in self.not_before for t in self.graph.tasks
                ):
                    # Nothing runs, nothing can start: only possible with a broken graph.
                    stuck = [t for t, s in self.states.items() if s == "waiting"]
                    raise UsageError(f"cannot schedule steps {', '.join(stuck)}: their dependencies never finish")
                self.progress.tick()
                time.sleep(_POLL)


class QuietWhenReaderGone:
    """A text stream that goes quiet once its reader goes away (``run-local | head``): the run
    goes on to its end instead of failing on a progress line with its steps left running."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.gone = False

    def write(self, text: str) -> int:
        if not self.gone:
            try:
                return self.stream.write(text)
            except (BrokenPipeError, ValueError):  # a closed pipe, a closed file
                self.gone = True
        return len(text)

    def flush(self) -> None:
        if not self.gone:
            try:
                self.stream.flush()
            except (BrokenPipeError, ValueError):
                self.gone = True

    def isatty(self) -> bool:
        return not self.gone and self.stream.isatty()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


def _last_error_line(log_path: Path) -> str | None:
    """The failing command's own final error (kvx-runtime logs one on every failure): its
    ``error`` field (the message without the replay hint) or its message."""
    try:
        lines = log_path.read_text(errors="replace").splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        if line.startswith("{"):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record.get("severity") == "ERROR":
                return str(record.get("error") or record.get("message"))
    return lines[-1][:500] if lines else None


def default_job_name(spec: Mapping[str, Any]) -> str:
    name = spec_pipeline_name(spec)
    return f"{name}-{time.strftime('%Y%m%d%H%M%S')}"


def run_directory(project: str | Path, job: str) -> Path:
    """Where run-local keeps a job's logs and step outputs."""
    return Path(project).resolve() / LOCAL_STATE_DIR / "runs" / job


def release_job_name(project: str | Path, job: str) -> None:
    """Give back a name :func:`claim_default_job_name` claimed, if its run left nothing in it
    (a run that failed before it started: the next run takes the name, no empty directory stays)."""
    with contextlib.suppress(OSError):
        run_directory(project, job).rmdir()  # only an empty directory goes


def claim_default_job_name(spec: Mapping[str, Any], project: str | Path) -> str:
    """A job name of its own for a run started without one: the pipeline's name and the second,
    as on Vertex AI, with ``-2``, ``-3``... when a run in the same project started in the same
    second (two run-locals started together would otherwise share a run directory, and the
    second would fail on the job directory the first owns). Its run directory is created here,
    atomically, so that two processes never claim the same name."""
    base = name = default_job_name(spec)
    run_directory(project, name).parent.mkdir(parents=True, exist_ok=True)
    attempt = 1
    while True:
        try:
            run_directory(project, name).mkdir()
            return name
        except FileExistsError:
            attempt += 1
            name = f"{base}-{attempt}"


def claim_job(project: str | Path, job: str | None, spec: Mapping[str, Any], *, resume: bool) -> str:
    """The run's job name with its run directory: ``job``'s (refused when a run of it exists
    and this is not its resume: a job name is one run, whose job directory a second run could
    not write), else one of its own (:func:`claim_default_job_name`)."""
    if job is None:
        return claim_default_job_name(spec, project)
    if resume:
        return job
    run_dir = run_directory(project, job)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    try:
        run_dir.mkdir()
    except FileExistsError:
        if any(run_dir.iterdir()):
            raise UsageError(f"job {job} has run already ({run_dir}): a job name is one run",
                             hint=f"run-local --resume {job} runs its unfinished steps again; "
                             "or choose another --job-name") from None
    return job


@contextlib.contextmanager
def job_held(project: str | Path, job: str) -> Iterator[None]:
    """Job ``job`` to this process while the block runs: a second run-local of the same job (a
    resume started twice) is refused instead of sharing its logs, status and job directory."""
    import fcntl

    run_dir = run_directory(project, job)
    run_dir.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(run_dir, os.O_RDONLY)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UsageError(f"job {job} is running in another run-local ({run_dir})",
                             hint="wait for it to end, or choose another --job-name") from None
        yield
    finally:
        os.close(descriptor)


def run_local(
    spec: Mapping[str, Any],
    project: str | Path,
    *,
    params: Mapping[str, Any] | None = None,
    storage_root: str | None = None,
    max_parallel: int = 4,
    job_name: str | None = None,
    stream: TextIO | None = None,
    fail_fast: bool = False,
    fresh_copies: bool = False,
    extra_env: Mapping[str, str] | None = None,
    run_id: str | None = None,
    served: Mapping[str, str] | None = None,
    resume: bool = False,
) -> LocalRunResult:
    """Run ``spec`` here. ``storage_root`` defaults to ``<project>/.kvx/storage``; the failure
    policy is the spec's ``kvx_failure_policy`` (fail_slow by default) unless ``fail_fast``;
    with ``fresh_copies`` every step starts in a fresh copy of what the project's image holds.
    ``run_id``: the run's id (default: a new uuid); ``served``: steps the step cache served before
    the run (step -> the run they come from), done without starting. ``resume``: run job
    ``job_name`` again as the same run (its id, creation time and job directory, so the same save
    version and intermediates), its steps that succeeded kept (with their outputs: the MLflow
    run's id) and the others run; UsageError when the job has no status to resume from."""
    project_path = Path(project).resolve()
    overrides = dict(params or {})
    definitions = spec.get("root", {}).get("inputDefinitions", {}).get("parameters", {})
    if STORAGE_ROOT_PARAMETER in definitions and STORAGE_ROOT_PARAMETER not in overrides:
        overrides[STORAGE_ROOT_PARAMETER] = storage_root or local_storage_root(project_path)
    graph = build_graph(spec, overrides)
    job = job_name or claim_default_job_name(spec, project_path)
    run_dir = run_directory(project_path, job)
    earlier = _resumable(run_dir, job, spec, set(graph.tasks)) if resume else None
    if earlier is not None:
        overrides = _resumed_values(earlier, job, overrides)
        graph = build_graph(spec, overrides)
    policy = "fail_fast" if fail_fast else str(graph.parameters.get(FAILURE_POLICY_PARAMETER, ("", "fail_slow"))[1])
    if policy not in FAILURE_POLICIES:
        raise UsageError(f"{FAILURE_POLICY_PARAMETER} {policy!r} is not one of {', '.join(FAILURE_POLICIES)}")
    run_dir.mkdir(parents=True, exist_ok=True)
    output = cast(TextIO, stream if isinstance(stream, QuietWhenReaderGone)
                  else QuietWhenReaderGone(stream or sys.stdout))
    scheduler = _Scheduler(graph, project_path, run_dir, job, max_parallel, output,
                           {"KVX_LOG_FORMAT": "json", **(extra_env or {})}, fail_fast=policy == "fail_fast",
                           fresh_copies=fresh_copies, run_id=run_id, served=served, resumed=earlier)
    copies = f", each step in a fresh copy of the project's image files ({run_dir / 'copies'})" if fresh_copies else ""
    verb = f"Resuming ({len(scheduler.kept)} steps done) " if earlier is not None else "Running "
    print(f"{verb}{describe_steps(graph.tasks)} of {spec_pipeline_name(spec)} "
          f"as job {job}, run id {scheduler.job_uuid}, {policy}{copies} (logs: {run_dir / 'logs'})",
          file=output, flush=True)
    try:
        # A second stop signal ends run-local at once: the steps go with it.
        with on_abrupt_exit(scheduler.kill_running):
            scheduler.run()
    except BaseException:  # a stop signal, or anything else: no step outlives run-local
        with on_abrupt_exit(scheduler.kill_running):
            scheduler.stop(STOP_GRACE_SECONDS)
            scheduler.run_exit_handlers(EXIT_HANDLER_SECONDS)
            _write_status(run_dir, job, scheduler, spec, overrides)
        raise

    _write_status(run_dir, job, scheduler, spec, overrides)
    failed = scheduler.failed_task
    exit_code = int(ExitCode.SUCCESS)
    replay = None
    if scheduler.failed_tasks:
        failed = failed or scheduler.failed_tasks[0]
        exit_code = scheduler.exit_codes.get(failed, 1) or 1
        replay = scheduler.replays.get(failed)
        _report_failures(scheduler, run_dir, output)
    return LocalRunResult(job_name=job, run_id=scheduler.job_uuid, run_dir=run_dir, states=dict(scheduler.states),
                          exit_code=exit_code, failed_task=failed, replay=replay,
                          outputs=scheduler.outputs, failed_tasks=list(scheduler.failed_tasks))


def _report_failures(scheduler: _Scheduler, run_dir: Path, output: TextIO) -> None:
    """Per failed step: its final error line, its log and its replay command; not whole logs."""
    failed = scheduler.failed_tasks
    skipped = sum(1 for state in scheduler.states.values() if state == "skipped")
    summary = f"{len(failed)} step{'s' if len(failed) > 1 else ''} failed"
    if skipped:
        summary += f", {skipped} skipped"
    lines = ["", summary + ":"]
    for task in failed:
        handler = " (exit handler)" if scheduler.graph.tasks[task].run_after_failure else ""
        lines += [
            f"  {task}{handler}: exit {scheduler.exit_codes.get(task)}: {scheduler.errors.get(task)}",
            f"    log:    {run_dir / 'logs' / f'{task}.log'}",
            f"    replay: {scheduler.replays.get(task)}",
        ]
    print("\n".join(lines), file=output, flush=True)


def _resumable(run_dir: Path, job: str, spec: Mapping[str, Any], tasks: set[str]) -> dict[str, Any]:
    """The status an earlier run of ``job`` left (``status.json``), if ``spec`` (its ``tasks``)
    can resume it: the same pipeline, the same steps."""
    path = run_dir / "status.json"
    try:
        status = json.loads(path.read_text())
        states, run_id, created = status["states"], status["run_id"], status["created"]
    except FileNotFoundError:
        raise UsageError(f"no local run of job {job} to resume ({path} does not exist)",
                         hint="resume the job name a failed run-local printed (its .kvx/runs/<job>/)") from None
    except (ValueError, KeyError, TypeError):
        raise UsageError(f"{path} is not a run's status: job {job} cannot be resumed") from None
    if not isinstance(states, dict) or not run_id or not created:
        raise UsageError(f"{path} is not a run's status: job {job} cannot be resumed")
    pipeline = spec_pipeline_name(spec)
    if status.get("pipeline") not in (None, pipeline):
        raise UsageError(f"job {job} ran pipeline {status['pipeline']}, not {pipeline}: it cannot be resumed with it",
                         hint="resume with the spec (or --pipeline and --env) the job ran")
    recorded = status.get("tasks")
    if isinstance(recorded, list) and set(recorded) != tasks:
        differing = sorted(set(recorded) ^ tasks)
        raise UsageError(
            f"job {job} ran other steps than this spec has ({', '.join(differing[:5])}"
            + (f" and {len(differing) - 5} more" if len(differing) > 5 else "") + "): it cannot be resumed with it",
            hint="resume with the spec (or --pipeline and --env) the job ran; a project changed since starts a new run",
        )
    if all(states.get(task) == "done" for task in tasks):
        raise UsageError(f"job {job} succeeded: nothing to resume", hint="run-local starts a new run")
    return dict(status)


def _kept_values(overrides: Mapping[str, str], run_id: str) -> dict[str, dict[str, str]]:
    """The run's ``--param`` values as its status keeps them: a secret-named one by its digest."""
    from kvx_runtime.params import says_secret

    return {name: {"sha256": _secret_digest(value, run_id)} if says_secret(name) else {"value": value}
            for name, value in overrides.items()}


def _secret_digest(value: str, run_id: str) -> str:
    """Salted with the run's id: the same secret looks different in every run's status."""
    return hashlib.sha256(f"{run_id}\0{value}".encode()).hexdigest()


def _resumed_values(status: Mapping[str, Any], job: str, given: Mapping[str, str]) -> dict[str, str]:
    """The values the resumed run had (a resumed run is the same run), with those given again
    checked against them; a secret-named one, kept only by its digest, must be given again."""
    kept = status.get("params")
    if not isinstance(kept, dict):  # a status written before the values were kept
        return dict(given)
    values: dict[str, str] = {}
    for name, was in kept.items():
        again = given.get(name)
        if name == STORAGE_ROOT_PARAMETER and again is not None and again != was.get("value"):
            raise UsageError(f"job {job} ran under storage root {was.get('value')}, not {again}",
                             hint=f"resume with --storage-root {was.get('value')}")
        if "value" in was:
            if again is not None and again != was["value"]:
                raise UsageError(f"--param {name}: job {job} ran with another value; a resumed run keeps the "
                                 "values it started with", hint=f"resume without --param {name}, or start a new run")
            values[name] = str(was["value"])
        elif again is None:
            raise UsageError(f"--param {name} must be given again to resume job {job} (a secret's value is not kept)")
        elif _secret_digest(again, str(status["run_id"])) != was.get("sha256"):
            raise UsageError(f"--param {name}: not the value job {job} ran with; a resumed run keeps the values it "
                             "started with", hint="give the value the run started with, or start a new run")
        else:
            values[name] = again
    added = sorted(set(given) - set(kept))
    if added:
        raise UsageError(f"--param {', '.join(added)}: job {job} ran without it; a resumed run keeps the values it "
                         "started with", hint="resume without it, or start a new run")
    return values


def _write_status(run_dir: Path, job: str, scheduler: _Scheduler, spec: Mapping[str, Any],
                  overrides: Mapping[str, str]) -> None:
    status = {
        "job_name": job,
        "pipeline": spec_pipeline_name(spec),
        "tasks": sorted(scheduler.graph.tasks),
        "params": _kept_values(overrides, scheduler.job_uuid),
        "run_id": scheduler.job_uuid,
        "states": scheduler.states,
        "exit_codes": scheduler.exit_codes,
        "failed_task": scheduler.failed_task,
        "created": scheduler.created,
        "outputs": scheduler.outputs,
    }
    (run_dir / "status.json").write_text(json.dumps(status, indent=2) + "\n")


def parse_overrides(items: Sequence[str]) -> dict[str, str]:
    """``name=value`` pairs; a dotted Kedro name maps to its pipeline parameter name."""
    from kvx_runtime.compiler.names import parameter_name

    result: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise UsageError(f"--param {item!r} must look like name=value")
        name = name.strip()
        result[parameter_name(name) if "." in name else name] = value
    return result
