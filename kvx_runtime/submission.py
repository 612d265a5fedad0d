"""From a compiled spec to a run on a target, and from a failed run to its cause.

- :func:`refuse_missing_inputs`: a run whose pipeline inputs are not under the cloud storage
  root is not submitted (its first step would fail after its machine started); a schedule's
  are warned about (:func:`warn_missing_inputs`);
- :func:`run_request`: the run of a compiled pipeline as the project configures it (job id
  ``<pipeline>-<UTC yyyymmddhhmmss>``, labels, service account, network, CMEK, failure policy,
  output directory, parameter values);
- :func:`watch`: poll with backoff, one line per task state change, a summary at the end;
- :func:`diagnose`: per failed task its error, what ran it, where its logs are and the
  ``exec-node`` command that replays it.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from datetime import datetime, timezone
from typing import Any

from kvx_runtime.compiler.spec import FAILURE_POLICY_PARAMETER, STORAGE_ROOT_PARAMETER
from kvx_runtime.errors import ExitCode, KvxError
from kvx_runtime.log import get_logger
from kvx_runtime.step.invocation import ExecNodeInvocation, InvocationError
from kvx_runtime.targets.base import PAUSED_STATES, PipelineTarget, RunInfo, RunRequest, TaskInfo

__all__ = ["WaitTimeout", "absent_inputs", "diagnose", "job_id", "kvx_labels", "recorded_run_id",
           "refuse_missing_inputs", "run_request", "summary", "task_invocation", "warn_missing_inputs", "watch"]

log = get_logger(__name__)

_JOB_ID = re.compile(r"[^a-z0-9-]")


class WaitTimeout(KvxError):
    """Watching stopped while the run goes on: ``--timeout`` passed, or the run is paused."""

    exit_code = ExitCode.INFRASTRUCTURE


#: Inputs looked for at the same time (each a request to the store).
_LOOK_UPS_AT_ONCE = 8


def absent_inputs(inputs: Mapping[str, str], what: str = "pipeline input") -> list[str]:
    """Which of ``inputs`` (catalog name -> path under the cloud storage root, which compiling
    does not look for) are definitely not there, looked for all at once. One that cannot be
    told within ``KVX_INPUT_CHECK_TIMEOUT`` seconds, or whose look-up fails, is logged as a
    warning and not counted: an unanswered question never stops a run."""
    if not inputs:
        return []
    import queue
    import threading

    from kvx_runtime import settings

    timeout = settings.INPUT_CHECK_TIMEOUT.get()  # a bad value stops it before any look-up
    answers: dict[str, bool | BaseException] = {}
    waiting: queue.SimpleQueue[tuple[str, str]] = queue.SimpleQueue()
    for item in sorted(inputs.items()):
        waiting.put(item)

    def look() -> None:
        from kvx_runtime.storage.store import _filesystem

        while True:
            try:
                name, path = waiting.get_nowait()
            except queue.Empty:
                return
            try:  # the storage root's own file system set-up (credentials checked, retries)
                filesystem, stripped = _filesystem(path)
                answers[name] = bool(filesystem.exists(stripped))
            except BaseException as exc:  # told as "could not tell", never as missing
                answers[name] = exc

    # A few daemon threads: a look-up given up on must not keep the process from ending.
    threads = [threading.Thread(target=look, daemon=True, name=f"kvx-inputs-{index}")
               for index in range(min(_LOOK_UPS_AT_ONCE, len(inputs)))]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + timeout
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    answered = dict(answers)
    for name in sorted(inputs):
        error = answered.get(name)
        if isinstance(error, bool):
            continue
        reason = f"no answer within {timeout:g} s" if error is None else f"{type(error).__name__}: {error}"
        log.warning(f"could not tell whether {what} '{name}' is at {inputs[name]} ({reason}): going on",
                    dataset=name, hint="KVX_INPUT_CHECK_TIMEOUT sets the wait")
    return sorted(name for name, there in answered.items() if there is False)


def refuse_missing_inputs(inputs: Mapping[str, str]) -> None:
    """Before a run is submitted: :func:`absent_inputs` stop it (exit 2, one line naming each
    and its path): the step reading one would fail after its machine started."""
    missing = absent_inputs(inputs)
    if not missing:
        return
    from kvx_runtime.errors import UsageError

    listed = ", ".join(f"'{name}' at {inputs[name]}" for name in missing)
    raise UsageError(
        f"pipeline input{'s' if len(missing) > 1 else ''} not in the storage root: {listed}; the step reading "
        f"{'them' if len(missing) > 1 else 'it'} would fail, so nothing was submitted",
        hint="copy the project's files there first (`kvx-runtime init --cloud-env` lists what to copy where)",
    )


def warn_missing_inputs(inputs: Mapping[str, str]) -> list[str]:
    """Before a schedule is set: :func:`absent_inputs` are warned about (they may be copied
    before its first run); returns their names."""
    missing = absent_inputs(inputs)
    for name in missing:
        log.warning(f"pipeline input '{name}' is not at {inputs[name]}: scheduled runs fail until it is copied there",
                    dataset=name)
    return missing


def job_id(pipeline_name: str, now: datetime | None = None) -> str:
    """``<pipeline name>-<UTC yyyymmddhhmmss>``, valid as a Vertex AI PipelineJob id
    (``[a-z][-a-z0-9]*``, at most 128 characters)."""
    stamp = (now or datetime.now(timezone.utc)).strftime("%Y%m%d%H%M%S")
    base = _JOB_ID.sub("-", pipeline_name.lower()).strip("-") or "pipeline"
    if not base[0].isalpha():
        base = "p-" + base
    return f"{base[: 127 - len(stamp) - 1]}-{stamp}"


def kvx_labels(pipeline_name: str, user_labels: Mapping[str, str]) -> dict[str, str]:
    """The user's labels plus kvx-runtime's own (which pipeline, which kvx version)."""
    from kvx_runtime import __version__
    from kvx_runtime.compiler.names import label_value

    return {**user_labels, "kvx-pipeline": label_value(pipeline_name), "kvx-version": label_value(__version__)}


def run_request(spec: Mapping[str, Any], run_config: Any, *, values: Mapping[str, Any] | None = None,
                now: datetime | None = None, template_uri: str | None = None,
                platform_spec: Mapping[str, Any] | None = None) -> RunRequest:
    """The run of ``spec`` (with its Kubernetes ``platform_spec``) that ``run_config``
    (``vertexai.yml``) describes."""
    from kvx_runtime.compiler.kfp_reader import spec_pipeline_name

    name = spec_pipeline_name(spec)
    definitions = spec.get("root", {}).get("inputDefinitions", {}).get("parameters", {})
    policy = str(values.get(FAILURE_POLICY_PARAMETER) if values and FAILURE_POLICY_PARAMETER in values
                 else definitions.get(FAILURE_POLICY_PARAMETER, {}).get("defaultValue", run_config.failure_policy))
    storage_root = str(definitions.get(STORAGE_ROOT_PARAMETER, {}).get("defaultValue", ""))
    return RunRequest(
        spec=spec,
        run_id=job_id(name, now),
        display_name=name,
        parameters=dict(values or {}),
        labels=kvx_labels(name, run_config.labels),
        failure_policy=policy,
        output_root=storage_root if storage_root.startswith("gs://") else None,
        service_account=run_config.service_account,
        network=run_config.network.vpc,
        encryption_key=run_config.encryption_spec_key_name,
        template_uri=template_uri,
        platform_spec=platform_spec,
    )


def _clock(moment: datetime | None) -> str:
    return moment.astimezone(timezone.utc).strftime("%H:%M:%S") if moment else "--:--:--"


def watch(target: PipelineTarget, run: RunInfo, echo: Callable[[str], Any], *, timeout: float | None = None,
          first_poll: float = 5.0, max_poll: float = 60.0, sleep: Callable[[float], None] = time.sleep,
          status_command: str = "kvx-runtime status") -> RunInfo:
    """Poll ``run`` until it ends: one line per task state change as it happens."""
    started = time.monotonic()
    seen: dict[str, str] = {}
    poll = first_poll
    state = run.state
    echo(f"watching {run.run_id} ({run.state}); Ctrl-C stops watching, not the run")
    while True:
        for task in sorted(run.tasks, key=lambda t: (t.start or datetime.max.replace(tzinfo=timezone.utc), t.name)):
            if seen.get(task.name) != task.state:
                seen[task.name] = task.state
                suffix = f": {task.error}" if task.error else ""
                echo(f"  {_clock(task.end or task.start)} {task.state:<10} {task.name}{suffix}")
        if run.state != state:
            state = run.state
            echo(f"  run {run.state}")
        if run.finished:
            return run
        if run.state in PAUSED_STATES:  # it goes on only when resumed: waiting would never end
            raise WaitTimeout(f"{run.run_id} is {run.state}: it does not go on until it is resumed, so watching "
                              "stopped", hint=f"resume it, then watch it with `{status_command} {run.run_id}`")
        if timeout is not None and time.monotonic() - started > timeout:
            raise WaitTimeout(f"{run.run_id} is still {run.state} after {timeout:g} s; it keeps running",
                              hint=f"watch it with `{status_command} {run.run_id}`")
        sleep(poll)
        poll = min(max_poll, poll * 1.5)
        run = target.get(run.name)


def summary(run: RunInfo) -> str:
    counts: dict[str, int] = {}
    for task in run.tasks:
        counts[task.state] = counts.get(task.state, 0) + 1
    tasks = ", ".join(f"{n} {state.lower()}" for state, n in sorted(counts.items()))
    duration = f" in {run.duration / 60:.1f} min" if run.duration is not None else ""
    return f"{run.run_id}: {run.state}{duration} ({tasks or 'no tasks'})"


def _replay(spec: Mapping[str, Any], run: RunInfo, task: TaskInfo, values: Mapping[str, Any],
            target: PipelineTarget) -> list[str]:
    """The ``exec-node`` command of ``task`` as the step ran it (the one it printed), with a
    note when the run id it ran with is not known: lines for :func:`diagnose`."""
    invocation = task_invocation(spec, run, task, values, target.job_name(run))
    if invocation is None:
        return []
    invocation = invocation.shown()  # printed, not logged: the log's redaction does not see it
    run_id = target.step_run_id(run) or recorded_run_id(invocation)
    if run_id is None:
        return [f"  replay:  {invocation.command_line()}",
                "           (the run id is the job's: no step recorded the one it ran with, so ${run_id} "
                "paths may differ)"]
    return [f"  replay:  {invocation.with_values(run_id=run_id).command_line()}"]


def task_invocation(spec: Mapping[str, Any], run: RunInfo, task: TaskInfo, values: Mapping[str, Any],
                     job_name: str) -> ExecNodeInvocation | None:
    """``task``'s exec-node invocation with the run's values filled in (None for a task that
    runs no exec-node). The run id is the job's until the caller knows better; an MLflow run
    id known only to the run is left out (the step finds the run by job name)."""
    from kvx_runtime.compiler.kfp_reader import build_graph, render, substitute

    try:
        graph = build_graph(spec, {k: v for k, v in values.items()
                                   if k in spec.get("root", {}).get("inputDefinitions", {}).get("parameters", {})})
    except KvxError:
        return None
    local = graph.tasks.get(task.name)
    if local is None:
        return None
    created = run.create_time.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ") if run.create_time else ""
    job_values = {"pipeline_job_name": job_name, "pipeline_job_uuid": run.run_id,
                  "pipeline_job_create_time_utc": created, "pipeline_task_name": task.name}
    for name, source in local.inputs.items():
        if source.kind == "value":
            job_values[f"inputs.parameters['{name}']"] = substitute(
                render(local.input_types.get(name, "STRING"), source.value), job_values)
    container = local.container
    try:
        invocation = ExecNodeInvocation.parse([str(part) for part in
                                               [*container.get("command", []), *container.get("args", [])]])
    except InvocationError:
        return None

    def resolved(value: str | None) -> str | None:
        return None if value is None else substitute(value, job_values)

    try:
        mlflow_run_id = resolved(invocation.mlflow_run_id)
    except KvxError:
        mlflow_run_id = None
    try:
        changes: dict[str, Any] = {name: resolved(getattr(invocation, name)) for name in _SINGLE_VALUED}
        for name in ("nodes", "load_versions", "params"):
            changes[name] = tuple(substitute(item, job_values) for item in getattr(invocation, name))
    except KvxError:
        return None
    return replace(invocation, **changes, mlflow_run_id=mlflow_run_id)


_SINGLE_VALUED = ("env", "run_id", "job_name", "storage_root", "save_version", "job_create_time", "code")


def recorded_run_id(invocation: ExecNodeInvocation, *, strict: bool = False) -> str | None:
    """The run id recorded in the job directory by the run's first step (see
    :mod:`kvx_runtime.step.identity`); None if there is none, or (unless ``strict``: ``resume``
    must not take a record it could not read for no record) if it cannot be read quickly."""
    if not invocation.storage_root or not invocation.job_name:
        return None
    from kvx_runtime.errors import StorageError
    from kvx_runtime.step.identity import read_owner
    from kvx_runtime.storage.store import BlobStore, RetryPolicy

    try:
        return read_owner(BlobStore(invocation.storage_root, invocation.job_name,
                                    retry=RetryPolicy(attempts=2, budget=_RECORD_BUDGET)))
    except Exception as exc:  # a diagnosis goes on without it
        if strict:
            if isinstance(exc, KvxError):
                raise
            raise StorageError(f"the job directory's owner record under {invocation.storage_root} cannot be read: "
                               f"{type(exc).__name__}: {str(exc)[:200]}") from None
        log.info("the job directory's owner record cannot be read", error=f"{type(exc).__name__}: {exc}"[:300])
        return None


#: Seconds ``status`` spends reading a job directory's owner record.
_RECORD_BUDGET = 10.0


def diagnose(target: PipelineTarget, run: RunInfo, spec: Mapping[str, Any] | None,
             values: Mapping[str, Any] | None = None, *, fetch_logs: bool = False) -> list[str]:
    """Lines saying, per failed task, what failed and where to look."""
    failed = [task for task in run.tasks if task.state == "FAILED" and task.name]
    lines = []
    if run.error and not failed:
        lines.append(f"{run.run_id} {run.state}: {run.error}")
    for task in failed:
        lines.append(f"task {task.name} FAILED: {task.error or 'no error message'}")
        if task.executor:
            lines.append(f"  ran as:  {task.executor}")
        url = target.logs_url(run, task)
        if url:
            lines.append(f"  logs:    {url}")
        if fetch_logs:
            for entry in target.task_errors(run, task):
                lines.append(f"  log:     {entry}")
        replay = target.replay_command(run, task)
        if replay:
            lines.append(f"  replay:  {replay}")
        elif spec:
            lines += _replay(spec, run, task, values or {}, target)
    return lines
