"""``resume JOB``: a failed or cancelled run continued as the same pipeline run (docs/cache.md,
"Resume"). Where the target can run a run's unfinished tasks again within the run itself
(Airflow: clearing them), it does; elsewhere (Vertex AI, Kubeflow Pipelines) a new run continues it.

The new run's steps are given the old run's identity, storage root and save version literally,
so they read what the old run's finished steps wrote (its job directory, its ``${run_id}``
paths, its MLflow run) and write where it would have; the steps it finished are left out. The
steps that run are compiled from the project as it is now, with the old run's parameter values.
What the old run finished is read from its tasks: a step counts as finished when the task that
ran its nodes succeeded (a step whose nodes the old run grouped otherwise runs again).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import timezone
from typing import TYPE_CHECKING, Any

import click

from kvx_runtime.commands.command import Invocation, KvxCommand, invocation
from kvx_runtime.commands.options import env_option, project_path_option, wait_options
from kvx_runtime.commands.project import PipelineOptions, compile_request
from kvx_runtime.errors import UsageError

if TYPE_CHECKING:
    from kvx_runtime.compiler.planner import ResumedRun
    from kvx_runtime.project import KedroProject
    from kvx_runtime.step.invocation import ExecNodeInvocation
    from kvx_runtime.targets.base import PipelineTarget, RunInfo

__all__ = ["ResumeRequest", "check_resumable", "resume_command", "resume_run", "resumed_run"]


@dataclass(frozen=True)
class ResumeRequest:
    at: Invocation
    job: str
    wait: bool | None = None
    timeout: float | None = None


def check_resumable(run: RunInfo) -> None:
    """UsageError unless ``run`` ended without succeeding."""
    if not run.finished:
        raise UsageError(f"run {run.run_id} is {run.state}: only a run that ended can be resumed",
                         hint="wait for it to end, or cancel it first")
    if run.state == "SUCCEEDED":
        raise UsageError(f"run {run.run_id} succeeded: nothing to resume", hint="run-once starts a new run")


def resumed_run(target: PipelineTarget, run: RunInfo) -> tuple[ResumedRun, ExecNodeInvocation]:
    """What the new run continues of ``run`` (a failed or cancelled run of a compiled pipeline),
    and one of its node steps as it ran (its pipeline, env, parameters and load versions are the
    run's). UsageError when there is nothing to resume."""
    from kvx_runtime.cache.key import step_identity
    from kvx_runtime.compiler.planner import ResumedRun
    from kvx_runtime.step.serving import parse_serve_step
    from kvx_runtime.submission import recorded_run_id, task_invocation

    check_resumable(run)
    if not run.spec:
        raise UsageError(f"the {target.title} API does not return run {run.run_id}'s pipeline spec: "
                         "what its steps ran cannot be told", hint="run-once starts the pipeline again")
    job_name = target.job_name(run)
    invocations = {task.name: task_invocation(run.spec, run, task, run.parameters, job_name) for task in run.tasks}
    ran = [item for item in invocations.values() if item is not None]
    if not ran:
        raise UsageError(f"run {run.run_id} has no step that ran a Kedro node: nothing to keep",
                         hint="run-once starts the pipeline again")
    first = ran[0]
    run_id = target.step_run_id(run) or recorded_run_id(first, strict=True)
    if run_id is None or not first.storage_root or not first.job_name:
        raise UsageError(f"no step of run {run.run_id} recorded the run id it ran with (in its job directory "
                         f"under {first.storage_root}): nothing it wrote can be found",
                         hint="run-once starts the pipeline again")
    done: set[str] = set()
    for task in run.tasks:
        item = invocations.get(task.name)
        if task.state != "SUCCEEDED" or item is None:
            continue
        # A cache-serve step made each of the steps it served this run's.
        groups = [parse_serve_step(text) for text in item.serve_steps] or [item.nodes]
        done.update(step_identity(nodes) for nodes in groups)
    done.update(_finished_before(run.spec))  # a resumed run's spec names what it left out
    created = run.create_time.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ") if run.create_time else ""
    return ResumedRun(run_id=run_id, job_name=first.job_name, storage_root=first.storage_root,
                      save_version=first.save_version or "", job_create_time=first.job_create_time or created,
                      done_steps=frozenset(done)), first


#: The pipeline input of a resumed run's spec naming the steps earlier runs of the job finished
#: (left out of it): resuming that run keeps them too.
FINISHED_STEPS_PARAMETER = "kvx_finished_steps"


def _finished_before(spec: Mapping[str, Any]) -> set[str]:
    declared = spec.get("root", {}).get("inputDefinitions", {}).get("parameters", {}).get(FINISHED_STEPS_PARAMETER)
    try:
        steps = json.loads(declared["defaultValue"]) if isinstance(declared, dict) else []
    except (KeyError, TypeError, ValueError):
        return set()
    return {str(step) for step in steps} if isinstance(steps, list) else set()


def _note_finished(spec: dict[str, Any], steps: Iterable[str]) -> None:
    """Declare the finished steps in the resumed run's spec (an input no task reads)."""
    parameters = spec.setdefault("root", {}).setdefault("inputDefinitions", {}).setdefault("parameters", {})
    parameters[FINISHED_STEPS_PARAMETER] = {"parameterType": "STRING", "isOptional": True,
                                            "defaultValue": json.dumps(sorted(steps))}


def _gone_blobs(resumed: ResumedRun, kept_blobs: Mapping[str, str]) -> list[str]:
    """The blobs of ``resumed`` that the steps to run read from finished steps and that are
    definitely not in its job directory (a look-up that cannot answer is warned, not counted)."""
    from kvx_runtime.storage.store import blob_url
    from kvx_runtime.submission import absent_inputs

    where = {name: blob_url(resumed.storage_root, resumed.job_name, name) for name in kept_blobs}
    return absent_inputs(where, what="intermediate dataset")


def _mark_resumed(storage_root: str, job_name: str) -> None:
    """The job's activity recorded (before a new run's kept blobs are looked up; as soon as a
    run's tasks are cleared to run again in place): from now until its steps run (minutes of
    machine start-up), gc takes the job for one at work, not finished."""
    from kvx_runtime import settings
    from kvx_runtime.log import get_logger
    from kvx_runtime.storage.activity import record_activity

    why = record_activity(storage_root, job_name, "resume", timeout=settings.INPUT_CHECK_TIMEOUT.get())
    if why is not None:
        get_logger(__name__).warning("could not record the resume in the job directory: a gc running before "
                                     "its steps start could delete what they read", job=job_name, error=why)


def _storage_root_of(run: RunInfo, project: KedroProject) -> str | None:
    """The storage root ``run``'s steps were given: its own parameter where the run set it,
    else the project's (what the published pipeline was compiled with)."""
    from kvx_runtime.compiler.spec import STORAGE_ROOT_PARAMETER
    from kvx_runtime.config import resolve_storage_root

    given = run.parameters.get(STORAGE_ROOT_PARAMETER)
    if isinstance(given, str) and given:
        return given
    return resolve_storage_root(None, project.plugin_config.run_config.root, required=False)


def _param_values(items: tuple[str, ...]) -> dict[str, str]:
    """``--param KEY[:KIND]=VALUE`` items (resolved) -> ``{KEY: VALUE}``."""
    from kvx_runtime.params import split_param

    return {key: value for key, _, value in map(split_param, items)}


def resume_run(request: ResumeRequest) -> None:
    """Submit the run that continues ``request.job``; with ``wait``, watch it to its end."""
    from kvx_runtime.commands.service import open_target, watch_to_end
    from kvx_runtime.compiler import compile_pipeline
    from kvx_runtime.submission import refuse_missing_inputs, run_request

    target, project = open_target(request.at)
    old = target.get(request.job)
    check_resumable(old)
    run_config = project.plugin_config.run_config
    wait = run_config.wait_for_completion if request.wait is None else request.wait
    unfinished = [task.name for task in old.tasks if task.state != "SUCCEEDED"]
    again = target.rerun_unfinished(old)
    if again is not None:
        root = _storage_root_of(old, project)
        if root:
            _mark_resumed(root, target.job_directory(old))
        click.echo(f"Resuming {old.name} in place: {len(unfinished)} unfinished task"
                   f"{'s' if len(unfinished) != 1 else ''} cleared to run again")
        click.echo(f"  {target.console_url(again)}")
        if wait:
            watch_to_end(request.at, target, again, request.timeout, None, old.parameters, fetch_logs=True)
        return
    resumed, ran = resumed_run(target, old)
    env = ran.env or project.env
    if request.at.env not in (None, env):
        raise UsageError(f"run {old.run_id} ran with env {env}, not {request.at.env}",
                         hint="resume it without --env, or with its own")
    # As the run ran: with uploaded code (the workspace's now: the fix) and its step cache setting.
    options = PipelineOptions(ran.pipeline, load_versions=ran.load_versions, code_upload=True if ran.code else None,
                              cache=ran.cache)
    compile_at = replace(compile_request(request.at.in_env(env), options, resumed.storage_root), resume=resumed,
                         values=_param_values(ran.params))
    compiled = compile_pipeline(compile_at)
    ran_name = (old.spec or {}).get("pipelineInfo", {}).get("name")
    this_name = compiled.spec.get("pipelineInfo", {}).get("name")
    if ran_name and this_name and ran_name != this_name:
        # Another project's (or pipeline's) job: its steps would write into that job's directory.
        raise UsageError(f"run {old.run_id} ran pipeline {ran_name}, not this project's {this_name}",
                         hint="resume it from its own project (and pipeline)")
    _mark_resumed(resumed.storage_root, resumed.job_name)
    finished_at_first = len(compiled.finished_steps)
    rerun: dict[str, list[str]] = {}
    while gone := _gone_blobs(resumed, compiled.kept_blobs):
        # Deleted since (gc, a bucket's lifecycle rule): the steps that wrote them run again.
        for name in gone:
            rerun.setdefault(compiled.kept_blobs[name], []).append(name)
        resumed = replace(resumed, done_steps=resumed.done_steps - set(rerun))
        compiled = compile_pipeline(replace(compile_at, resume=resumed))
    kept = len(compiled.finished_nodes)
    if rerun:
        from kvx_runtime.storage.store import job_directory_url

        datasets = sorted(name for names in rerun.values() for name in names)
        downstream = finished_at_first - len(compiled.finished_steps) - len(rerun)
        click.echo(f"{len(rerun)} finished step{'s' if len(rerun) != 1 else ''} run again: what "
                   f"{'they' if len(rerun) != 1 else 'it'} wrote is gone from "
                   f"{job_directory_url(resumed.storage_root, resumed.job_name)} ({', '.join(datasets)})"
                   + (f"; {downstream} finished step{'s' if downstream != 1 else ''} downstream of "
                      f"{'them' if len(rerun) != 1 else 'it'} too" if downstream > 0 else ""))
    if not compiled.steps:
        raise UsageError(f"every step of run {old.run_id} finished: nothing to resume")
    refuse_missing_inputs(compiled.remote_inputs)  # those the steps left to run read
    _note_finished(compiled.spec, compiled.finished_steps)  # only those left out: the others run again
    inputs = compiled.spec.get("root", {}).get("inputDefinitions", {}).get("parameters", {})
    values: dict[str, Any] = {name: value for name, value in old.parameters.items() if name in inputs}
    submitted = run_request(compiled.spec, project.plugin_config.run_config, values=values,
                            platform_spec=compiled.platform_spec)
    run = target.submit(submitted)
    steps = len(compiled.steps)
    click.echo(f"Resuming {old.run_id} as {run.name}: {kept} finished node{'s' if kept != 1 else ''} kept, "
               f"{steps} step{'s' if steps != 1 else ''} to run (as run {resumed.run_id} of job {resumed.job_name})")
    click.echo(f"  {target.console_url(run)}")
    if wait:
        watch_to_end(request.at, target, run, request.timeout, compiled.spec, values)


@click.command("resume", cls=KvxCommand)
@click.argument("job")
@project_path_option
@env_option
@wait_options
@click.pass_context
def resume_command(ctx: click.Context, job: str, project_path: str | None, env: str | None, wait: bool | None,
                   timeout: float | None) -> None:
    """Continue the failed or cancelled run JOB in a new run: the steps it finished are kept (not
    run again), the others run with the project as it is now, as the same pipeline run."""
    resume_run(ResumeRequest(invocation(ctx, project_path, env), job, wait, timeout))
