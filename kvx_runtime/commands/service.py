"""Commands that talk to the pipeline service of the command's group (Vertex AI at the top,
Kubeflow Pipelines under ``kfp``...): ``run-once``, ``schedule``, ``upload-pipeline``,
``list-pipelines``, ``status``, ``cancel`` and ``ui``.

The bodies know a :class:`~kvx_runtime.targets.base.PipelineTarget` only; which one, and how it
is built from the project's config, is the registry's (:mod:`kvx_runtime.targets.registry`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from kvx_runtime import settings
from kvx_runtime.commands.command import Invocation, KvxCommand, invocation
from kvx_runtime.commands.options import (
    env_option,
    pipeline_options,
    project_path_option,
    submit_options,
    wait_options,
)
from kvx_runtime.commands.project import PipelineOptions, compile_for
from kvx_runtime.errors import Interrupted

if TYPE_CHECKING:
    from kvx_runtime.compiler import CompiledPipeline
    from kvx_runtime.project import KedroProject
    from kvx_runtime.targets.base import PipelineTarget, RunInfo

__all__ = [
    "CancelRequest",
    "ConsoleRequest",
    "ListRunsRequest",
    "RunOnceRequest",
    "SchedulePipelineRequest",
    "StatusRequest",
    "UploadPipelineRequest",
    "cancel_run",
    "list_runs",
    "open_target",
    "project_version",
    "run_once",
    "schedule_pipeline",
    "show_console",
    "show_status",
    "upload_pipeline",
    "watch_to_end",
]


def open_target(at: Invocation) -> tuple[PipelineTarget, KedroProject]:
    """The project and the client of the command's target, built from the project's config."""
    from kvx_runtime.project import open_project

    project = open_project(at.project_path, at.env)
    return at.target.build(project.plugin_config), project


def _compile(at: Invocation, project: KedroProject, options: PipelineOptions, storage_root: str | None,
             values: tuple[str, ...] = (), *, serve_cached: bool = False) -> CompiledPipeline:
    """``serve_cached``: a run about to be submitted, whose steps the step cache has are left out."""
    return compile_for(at.in_env(project.env), options, storage_root, values,
                       serving=project if serve_cached else None, project=project)


def _finish(target: PipelineTarget, run: RunInfo, spec: Mapping[str, Any] | None, values: Mapping[str, Any],
            fetch_logs: bool = False) -> None:
    """Print the summary and, on failure, the diagnosis; exit 1 unless the run succeeded."""
    from kvx_runtime.errors import NodeError
    from kvx_runtime.submission import diagnose, summary

    click.echo(summary(run))
    if run.state == "SUCCEEDED":
        return
    for line in diagnose(target, run, spec, values, fetch_logs=fetch_logs):
        click.echo(line)
    raise NodeError(f"pipeline run {run.run_id} {run.state}", hint=target.console_url(run))


# --- run-once ------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunOnceRequest:
    at: Invocation
    options: PipelineOptions = field(default_factory=PipelineOptions)
    values: tuple[str, ...] = ()  # KEY=VALUE: Kedro parameters of this run
    storage_root: str | None = None
    template: str | None = None  # the tag of an uploaded spec to run instead
    wait: bool | None = None  # None: run_config.wait_for_completion
    timeout: float | None = None


def run_once(request: RunOnceRequest) -> None:
    """Compile, submit; with ``wait``, watch the run to its end (NodeError unless it succeeded)."""
    from kvx_runtime.submission import job_id, refuse_missing_inputs, run_request

    target, project = open_target(request.at)
    compiled = _compile(request.at, project, request.options, request.storage_root, request.values,
                        serve_cached=request.template is None)
    refuse_missing_inputs(compiled.remote_inputs)
    run_config = project.plugin_config.run_config
    submitted = run_request(compiled.spec, run_config, values=compiled.values,
                            template_uri=target.template_uri(compiled.spec, request.template),
                            platform_spec=compiled.platform_spec)
    name = target.run_once_name()
    if name:
        submitted = replace(submitted, run_id=job_id(name))
    run = target.submit(submitted)
    click.echo(f"Submitted {run.name}" + (f" ({run.display_name})" if run.display_name != run.name else ""))
    click.echo(f"  {target.console_url(run)}")
    if not (run_config.wait_for_completion if request.wait is None else request.wait):
        return
    watch_to_end(request.at, target, run, request.timeout, compiled.spec, compiled.values)


def watch_to_end(at: Invocation, target: PipelineTarget, run: RunInfo, timeout: float | None,
                 spec: Mapping[str, Any] | None, values: Mapping[str, Any], fetch_logs: bool = False) -> None:
    """Watch a submitted run until it ends (or ``timeout``), then :func:`_finish` it (with the
    failed tasks' last log lines when ``fetch_logs``)."""
    from kvx_runtime.submission import watch

    interval = settings.WATCH_INTERVAL.get()
    try:
        run = watch(target, run, click.echo, timeout=timeout, first_poll=interval,
                    status_command=at.sibling("status"),
                    max_poll=max(interval, 60.0 if interval >= 5 else interval))
    except Interrupted:  # Ctrl-C (SIGINT, turned into Interrupted by the process contract)
        click.echo(f"Stopped watching; the run goes on. Cancel it with: {at.sibling('cancel')} {run.run_id}")
        raise
    _finish(target, run, spec, values, fetch_logs=fetch_logs)


@click.command("run-once", cls=KvxCommand)
@project_path_option
@env_option
@pipeline_options
@submit_options
@wait_options
@click.pass_context
def run_once_command(ctx: click.Context, project_path: str | None, env: str | None, pipeline: str,
                     image: str | None, params: tuple[str, ...], load_versions: tuple[str, ...],
                     code_upload: bool | None, cache: str | None,
                     values: tuple[str, ...], storage_root: str | None, template: str | None, wait: bool | None,
                     timeout: float | None) -> None:
    """Compile the pipeline and run it once (on Vertex AI; under `kfp`, Kubeflow Pipelines); with
    --wait, watch it to the end."""
    run_once(RunOnceRequest(
        at=invocation(ctx, project_path, env),
        options=PipelineOptions(pipeline, image, params, load_versions, code_upload, cache),
        values=values, storage_root=storage_root, template=template, wait=wait, timeout=timeout,
    ))


# --- status, list-pipelines, cancel, ui ----------------------------------------------------


@dataclass(frozen=True)
class StatusRequest:
    at: Invocation
    job: str
    fetch_logs: bool = False


def show_status(request: StatusRequest) -> None:
    """The run's state and tasks; a finished run's summary (and diagnosis unless it succeeded)."""
    target, _ = open_target(request.at)
    info = target.get(request.job)
    click.echo(f"{info.run_id}: {info.state}  {target.console_url(info)}")
    for task in info.tasks:
        click.echo(f"  {task.state:<10} {task.name}" + (f": {task.error}" if task.error else ""))
    if info.finished:
        _finish(target, info, info.spec, info.parameters, fetch_logs=request.fetch_logs)


@click.command("status", cls=KvxCommand)
@click.argument("job")
@project_path_option
@env_option
@click.option("--logs", "fetch_logs", is_flag=True, help="Also fetch failed tasks' last error log entries.")
@click.pass_context
def status_command(ctx: click.Context, job: str, project_path: str | None, env: str | None, fetch_logs: bool) -> None:
    """A run's state and its tasks; for a failed run, what failed and where to look."""
    show_status(StatusRequest(invocation(ctx, project_path, env), job, fetch_logs))


@dataclass(frozen=True)
class ListRunsRequest:
    at: Invocation
    pipeline: str = "__default__"
    limit: int = 20
    all_pipelines: bool = False


def list_runs(request: ListRunsRequest) -> None:
    """The newest runs of the pipeline (of every pipeline with ``all_pipelines``), a line each."""
    from itertools import islice

    target, project = open_target(request.at)
    name = target.pipeline_name(project.package_name, request.pipeline)
    runs = list(islice(target.list_runs(None if request.all_pipelines else name), request.limit))
    click.echo(f"{'JOB':<60} {'STATE':<10} {'STARTED (UTC)':<19} DURATION")
    for info in runs:
        started = info.start_time.strftime("%Y-%m-%d %H:%M:%S") if info.start_time else "-"
        duration = f"{info.duration / 60:.1f} min" if info.duration is not None else "-"
        click.echo(f"{info.run_id:<60} {info.state:<10} {started:<19} {duration}")
    if not runs:
        click.echo("no runs")


@click.command("list-pipelines", cls=KvxCommand)
@project_path_option
@env_option
@click.option("-p", "--pipeline", default="__default__", show_default=True, help="Registered pipeline.")
@click.option("--limit", default=20, show_default=True, type=click.IntRange(min=1), help="How many runs.")
@click.option("--all", "all_pipelines", is_flag=True, help="Runs of every pipeline, not only this one.")
@click.pass_context
def list_pipelines_command(ctx: click.Context, project_path: str | None, env: str | None, pipeline: str,
                           limit: int, all_pipelines: bool) -> None:
    """Runs of this pipeline, newest first: job, state, start, duration."""
    list_runs(ListRunsRequest(invocation(ctx, project_path, env), pipeline, limit, all_pipelines))


@dataclass(frozen=True)
class CancelRequest:
    at: Invocation
    job: str


def cancel_run(request: CancelRequest) -> None:
    target, _ = open_target(request.at)
    target.cancel(request.job)
    click.echo(f"Cancellation of {request.job} requested; `{request.at.sibling('status')} {request.job}` "
               "shows when it stopped")


@click.command("cancel", cls=KvxCommand)
@click.argument("job")
@project_path_option
@env_option
@click.pass_context
def cancel_command(ctx: click.Context, job: str, project_path: str | None, env: str | None) -> None:
    """Ask the pipeline service to cancel a run (Kubeflow Pipelines: terminate it)."""
    cancel_run(CancelRequest(invocation(ctx, project_path, env), job))


@dataclass(frozen=True)
class ConsoleRequest:
    at: Invocation
    open_browser: bool = False


def show_console(request: ConsoleRequest) -> None:
    target, _ = open_target(request.at)
    url = target.console_url()
    click.echo(url)
    if request.open_browser:
        import webbrowser

        webbrowser.open(url)


@click.command("ui", cls=KvxCommand)
@project_path_option
@env_option
@click.option("--open", "open_browser", is_flag=True, help="Also open it in a browser.")
@click.pass_context
def ui_command(ctx: click.Context, project_path: str | None, env: str | None, open_browser: bool) -> None:
    """Print the pipeline service's console URL (--open: open a browser)."""
    show_console(ConsoleRequest(invocation(ctx, project_path, env), open_browser))


# --- schedule ------------------------------------------------------------------------------


@dataclass(frozen=True)
class SchedulePipelineRequest:
    at: Invocation
    options: PipelineOptions = field(default_factory=PipelineOptions)
    values: tuple[str, ...] = ()
    storage_root: str | None = None
    template: str | None = None
    #: Each None: the schedule's config (run_config.schedules.<pipeline>, else .default_schedule).
    cron: str | None = None
    timezone: str | None = None
    start_time: str | None = None
    end_time: str | None = None
    max_run_count: int | None = None
    max_concurrent_runs: int | None = None
    allow_queueing: bool | None = None
    #: pause, resume or delete the existing schedule; None: create or update it.
    action: str | None = None


def schedule_pipeline(request: SchedulePipelineRequest) -> None:
    """Create or update (in place, by display name) the pipeline's recurring run, or pause,
    resume or delete it."""
    from kvx_runtime.config import ScheduleConfig
    from kvx_runtime.errors import ConfigError, UsageError
    from kvx_runtime.submission import run_request, warn_missing_inputs
    from kvx_runtime.targets.base import ScheduleRequest

    target, project = open_target(request.at)
    run_config = project.plugin_config.run_config
    key = request.options.pipeline if request.options.pipeline in run_config.schedules else "default_schedule"
    configured = run_config.schedules.get(key) or ScheduleConfig()
    if request.action is not None:  # the schedule is found by name: nothing to compile
        from kvx_runtime.compiler.names import project_pipeline_name

        display_name = run_config.scheduled_run_name or project_pipeline_name(project.package_name,
                                                                              request.options.pipeline)
        existing = target.find_schedule(display_name)
        if existing is None:
            raise UsageError(f"no schedule named {display_name!r}", hint="create it with `schedule --cron ...`")
        after = target.set_schedule_state(existing.name, request.action)
        click.echo(f"Schedule {display_name}: {'deleted' if after is None else after.state}")
        return
    compiled = _compile(request.at, project, request.options, request.storage_root, request.values)
    warn_missing_inputs(compiled.remote_inputs)
    run = run_request(compiled.spec, run_config, values=compiled.values,
                      template_uri=target.template_uri(compiled.spec, request.template),
                      platform_spec=compiled.platform_spec)
    display_name = run_config.scheduled_run_name or run.display_name
    expression = request.cron or configured.cron_expression
    if not expression:
        raise ConfigError("no cron expression",
                          hint=f"pass --cron or set run_config.schedules.{key}.cron_expression")
    schedule, created = target.upsert_schedule(ScheduleRequest(
        display_name=display_name, cron=expression, timezone=request.timezone or configured.timezone, run=run,
        start_time=request.start_time or configured.start_time, end_time=request.end_time or configured.end_time,
        max_run_count=request.max_run_count or configured.max_run_count,
        max_concurrent_runs=request.max_concurrent_runs or configured.max_concurrent_run_count,
        allow_queueing=configured.allow_queueing if request.allow_queueing is None else request.allow_queueing,
    ))
    click.echo(f"Schedule {display_name} {'created' if created else 'updated'}: {schedule.cron} "
               f"({schedule.state}) {schedule.name}")


@click.command("schedule", cls=KvxCommand)
@project_path_option
@env_option
@pipeline_options
@submit_options
@click.option("--cron", default=None, help="Cron expression (default: run_config.schedules).")
@click.option("--timezone", default=None, help="IANA time zone of the cron expression (sent as TZ=<zone>).")
@click.option("--start-time", default=None, metavar="RFC3339", help="First possible run.")
@click.option("--end-time", default=None, metavar="RFC3339", help="No runs after this.")
@click.option("--max-run-count", type=click.IntRange(min=1), default=None, help="Stop after this many runs.")
@click.option("--max-concurrent-runs", type=click.IntRange(min=1), default=None, help="Runs at the same time.")
@click.option("--allow-queueing/--no-queueing", default=None, help="Queue runs beyond the concurrency limit.")
@click.option("--pause", "action_name", flag_value="pause", help="Pause the schedule.")
@click.option("--resume", "action_name", flag_value="resume", help="Resume the schedule.")
@click.option("--delete", "action_name", flag_value="delete", help="Delete the schedule.")
@click.pass_context
def schedule_command(ctx: click.Context, project_path: str | None, env: str | None, pipeline: str,
                     image: str | None, params: tuple[str, ...], load_versions: tuple[str, ...],
                     code_upload: bool | None, cache: str | None,
                     values: tuple[str, ...], storage_root: str | None, template: str | None,
                     cron: str | None, timezone: str | None,
                     start_time: str | None, end_time: str | None, max_run_count: int | None,
                     max_concurrent_runs: int | None, allow_queueing: bool | None, action_name: str | None) -> None:
    """Create or update (in place, by display name) the recurring run of this pipeline; or
    --pause, --resume, --delete it."""
    schedule_pipeline(SchedulePipelineRequest(
        at=invocation(ctx, project_path, env),
        options=PipelineOptions(pipeline, image, params, load_versions, code_upload, cache),
        values=values, storage_root=storage_root, template=template, cron=cron, timezone=timezone,
        start_time=start_time, end_time=end_time, max_run_count=max_run_count,
        max_concurrent_runs=max_concurrent_runs, allow_queueing=allow_queueing, action=action_name,
    ))


# --- upload-pipeline -----------------------------------------------------------------------


def project_version(path: Path) -> str | None:
    """[project] version of the project's pyproject.toml, if it has one."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    try:
        version = tomllib.loads((path / "pyproject.toml").read_text(encoding="utf-8"))["project"]["version"]
    except (OSError, KeyError, ValueError):
        return None
    return str(version)


@dataclass(frozen=True)
class UploadPipelineRequest:
    at: Invocation
    options: PipelineOptions = field(default_factory=PipelineOptions)
    storage_root: str | None = None
    tags: tuple[str, ...] = ()


def upload_pipeline(request: UploadPipelineRequest) -> None:
    """Compile the pipeline and publish it on the target (what and where: the target's line)."""
    from kvx_runtime.targets.base import UploadRequest

    target, project = open_target(request.at)
    target.check_upload()  # before the compile (and its code upload) is spent on a refused upload
    compiled = _compile(request.at, project, request.options, request.storage_root)
    click.echo(target.upload(UploadRequest(
        spec=compiled.spec, platform_spec=compiled.platform_spec, tags=request.tags,
        project_version=project_version(project.path), commit=os.environ.get("KEDRO_CONFIG_COMMIT_ID"),
        description=str(project.plugin_config.run_config.description or ""),
    )))


@click.command("upload-pipeline", cls=KvxCommand)
@project_path_option
@env_option
@pipeline_options
@click.option("--storage-root", default=None, help="Default storage root of the runs (default: run_config.root).")
@click.option("--tag", "tags", multiple=True, help="Extra tags (always: the project version, the commit id, latest).")
@click.pass_context
def upload_pipeline_command(ctx: click.Context, project_path: str | None, env: str | None, pipeline: str,
                            image: str | None, params: tuple[str, ...], load_versions: tuple[str, ...],
                            code_upload: bool | None, cache: str | None, storage_root: str | None,
                            tags: tuple[str, ...]) -> None:
    """Compile the pipeline and upload it: to run_config.template_repository on Vertex AI (run-once
    and schedule run it with --template TAG), as a pipeline or a new version on Kubeflow Pipelines."""
    upload_pipeline(UploadPipelineRequest(
        at=invocation(ctx, project_path, env),
        options=PipelineOptions(pipeline, image, params, load_versions, code_upload, cache),
        storage_root=storage_root, tags=tags,
    ))
