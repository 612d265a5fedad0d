"""The Airflow target's own ``run-once``, ``schedule`` and ``upload-pipeline`` (``kvx-runtime
airflow ...`` / ``kedro airflow-k8s ...``): each compiles the project's pipeline into a DAG file
and publishes it to ``run_config.dags_folder`` before it asks Airflow anything, as a DAG's
schedule and parameters live in its file. ``status``, ``list-pipelines``, ``cancel`` and ``ui``
are the shared commands (:mod:`.service`), through :class:`~kvx_runtime.targets.airflow.AirflowTarget`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import click

from kvx_runtime.commands.airflow_compile import DagOptions, compile_dag_for, dag_options
from kvx_runtime.commands.command import Invocation, KvxCommand, invocation
from kvx_runtime.commands.options import env_option, pipeline_options, project_path_option, wait_options
from kvx_runtime.commands.project import PipelineOptions
from kvx_runtime.commands.service import open_target, project_version, watch_to_end

__all__ = [
    "DagRunOnceRequest",
    "DagScheduleRequest",
    "DagUploadRequest",
    "run_dag_once",
    "run_once_command",
    "schedule_command",
    "schedule_dag",
    "upload_dag",
    "upload_pipeline_command",
]

_storage_root_option = click.option("--storage-root", default=None,
                                    help="Storage root of the runs (default: run_config.root).")
_strict_option = click.option("--strict", is_flag=True,
                              help="Exit 2 on any compile warning (a trap that would fail in the cluster), "
                              "publishing nothing.")


# --- run-once ------------------------------------------------------------------------------


@dataclass(frozen=True)
class DagRunOnceRequest:
    at: Invocation
    options: PipelineOptions = field(default_factory=PipelineOptions)
    dag: DagOptions = field(default_factory=DagOptions)
    values: tuple[str, ...] = ()  # KEY=VALUE: Kedro parameters of this run (its conf)
    storage_root: str | None = None
    wait: bool | None = None  # None: run_config.wait_for_completion
    timeout: float | None = None
    strict: bool = False


def run_dag_once(request: DagRunOnceRequest) -> None:
    """Compile the DAG (without a schedule), publish it, wait for Airflow to parse it, trigger
    one run with this run's parameters as its conf; with ``wait``, watch it to its end."""
    from kvx_runtime.submission import job_id, refuse_missing_inputs
    from kvx_runtime.targets.airflow import dag_spec
    from kvx_runtime.targets.base import RunRequest

    target, project = open_target(request.at)
    target.check_upload()
    # A DAG scheduled by `schedule --cron` has a schedule the configuration does not: its run-once
    # copy is published apart too, never over it.
    scheduled = target.find_schedule(target.pipeline_name(project.package_name, request.options.pipeline)) is not None
    compiled = compile_dag_for(request.at.in_env(project.env), request.options, request.dag, request.storage_root,
                               request.values, strict=request.strict, run_once=True, serving=project,
                               published_schedule=scheduled)
    refuse_missing_inputs(compiled.remote_inputs)
    dag_id = compiled.dag.dag_id
    click.echo(f"Publishing DAG {dag_id} and waiting for Airflow to parse it")
    run = target.submit(RunRequest(spec=dag_spec(dag_id, compiled.dag.text), run_id=job_id(dag_id),
                                   display_name=dag_id, parameters=compiled.values))
    click.echo(f"Submitted {run.name}")
    click.echo(f"  {target.console_url(run)}")
    run_config = project.plugin_config.run_config
    if not (run_config.wait_for_completion if request.wait is None else request.wait):
        return
    # A task's log is one API call away on Airflow: a failure prints its tail.
    watch_to_end(request.at, target, run, request.timeout, None, compiled.values, fetch_logs=True)


@click.command("run-once", cls=KvxCommand)
@project_path_option
@env_option
@pipeline_options
@dag_options
@click.option("--param", "values", multiple=True, metavar="KEY=VALUE",
              help="Any Kedro parameter exposed with --params, for this run (its conf). Repeatable.")
@_storage_root_option
@wait_options
@_strict_option
@click.pass_context
def run_once_command(ctx: click.Context, project_path: str | None, env: str | None, pipeline: str,
                     image: str | None, params: tuple[str, ...], load_versions: tuple[str, ...],
                     code_upload: bool | None, cache: str | None, operator: str, worker_project_path: str | None,
                     values: tuple[str, ...], storage_root: str | None, wait: bool | None, timeout: float | None,
                     strict: bool) -> None:
    """Publish the pipeline's DAG (a scheduled DAG's copy without its schedule: <dag_id>-run-once)
    and trigger one run; with --wait, watch it to the end."""
    run_dag_once(DagRunOnceRequest(
        at=invocation(ctx, project_path, env),
        options=PipelineOptions(pipeline, image, params, load_versions, code_upload, cache),
        dag=DagOptions(operator, worker_project_path), values=values, storage_root=storage_root, wait=wait,
        timeout=timeout, strict=strict,
    ))


# --- schedule ------------------------------------------------------------------------------


@dataclass(frozen=True)
class DagScheduleRequest:
    at: Invocation
    options: PipelineOptions = field(default_factory=PipelineOptions)
    dag: DagOptions = field(default_factory=DagOptions)
    storage_root: str | None = None
    #: Each None: run_config.schedule / start_date.
    cron: str | None = None
    start_date: str | None = None
    #: pause, resume or delete the DAG's schedule; None: publish the DAG with it and unpause it.
    action: str | None = None
    strict: bool = False


def schedule_dag(request: DagScheduleRequest) -> None:
    from kvx_runtime.errors import ConfigError, UsageError
    from kvx_runtime.submission import warn_missing_inputs
    from kvx_runtime.targets.airflow import dag_spec
    from kvx_runtime.targets.base import RunRequest, ScheduleRequest

    target, project = open_target(request.at)
    run_config = project.plugin_config.run_config
    if request.action is not None:  # the DAG is found by its id: nothing to compile
        dag_id = target.pipeline_name(project.package_name, request.options.pipeline)
        if request.action != "delete" and target.find_schedule(dag_id) is None:
            raise UsageError(f"Airflow has no scheduled DAG {dag_id}", hint="create it with `schedule --cron ...`")
        after = target.set_schedule_state(dag_id, request.action)
        click.echo(f"Schedule {dag_id}: {'deleted (DAG file and DAG)' if after is None else after.state}")
        return
    cron = request.cron or getattr(run_config, "schedule", None)
    if not cron:
        raise ConfigError("no schedule", hint="pass --cron or set run_config.schedule (and start_date)")
    overrides: dict[str, object] = {"schedule": cron}
    if request.start_date:
        overrides["start_date"] = request.start_date
    target.check_upload()
    compiled = compile_dag_for(request.at.in_env(project.env), request.options, request.dag, request.storage_root,
                               strict=request.strict, overrides=overrides, project=project)
    warn_missing_inputs(compiled.remote_inputs)
    dag_id = compiled.dag.dag_id
    spec = dag_spec(dag_id, compiled.dag.text)
    schedule, created = target.upsert_schedule(ScheduleRequest(
        display_name=dag_id, cron=cron, timezone=None,
        run=RunRequest(spec=spec, run_id=dag_id, display_name=dag_id),
    ))
    click.echo(f"Schedule {dag_id} {'created' if created else 'updated'}: {schedule.cron} ({schedule.state})"
               + (f", next run after {schedule.next_run_time:%Y-%m-%d %H:%M} UTC" if schedule.next_run_time else ""))


@click.command("schedule", cls=KvxCommand)
@project_path_option
@env_option
@pipeline_options
@dag_options
@_storage_root_option
@click.option("--cron", default=None, help="Cron expression or Airflow preset (default: run_config.schedule).")
@click.option("--start-date", default=None, metavar="DATE",
              help="The schedule's first logical date (default: run_config.start_date).")
@click.option("--pause", "action_name", flag_value="pause", help="Pause the DAG (its schedule stops).")
@click.option("--resume", "action_name", flag_value="resume", help="Unpause the DAG.")
@click.option("--delete", "action_name", flag_value="delete", help="Remove the DAG file and the DAG.")
@_strict_option
@click.pass_context
def schedule_command(ctx: click.Context, project_path: str | None, env: str | None, pipeline: str,
                     image: str | None, params: tuple[str, ...], load_versions: tuple[str, ...],
                     code_upload: bool | None, cache: str | None, operator: str, worker_project_path: str | None,
                     storage_root: str | None, cron: str | None, start_date: str | None, action_name: str | None,
                     strict: bool) -> None:
    """Publish the pipeline's DAG with its schedule and unpause it; or --pause, --resume, --delete it."""
    schedule_dag(DagScheduleRequest(
        at=invocation(ctx, project_path, env),
        options=PipelineOptions(pipeline, image, params, load_versions, code_upload, cache),
        dag=DagOptions(operator, worker_project_path), storage_root=storage_root, cron=cron, start_date=start_date,
        action=action_name, strict=strict,
    ))


# --- upload-pipeline -----------------------------------------------------------------------


@dataclass(frozen=True)
class DagUploadRequest:
    at: Invocation
    options: PipelineOptions = field(default_factory=PipelineOptions)
    dag: DagOptions = field(default_factory=DagOptions)
    storage_root: str | None = None
    strict: bool = False


def upload_dag(request: DagUploadRequest) -> None:
    """Compile the DAG as configured (schedule included) and publish it; Airflow's pause state is left as it is."""
    import os

    from kvx_runtime.targets.airflow import dag_spec
    from kvx_runtime.targets.base import UploadRequest

    target, project = open_target(request.at)
    target.check_upload()
    compiled = compile_dag_for(request.at.in_env(project.env), request.options, request.dag, request.storage_root,
                               strict=request.strict, project=project)
    click.echo(target.upload(UploadRequest(
        spec=dag_spec(compiled.dag.dag_id, compiled.dag.text), project_version=project_version(project.path),
        commit=os.environ.get("KEDRO_CONFIG_COMMIT_ID"),
        description=str(project.plugin_config.run_config.description or ""),
    )))


@click.command("upload-pipeline", cls=KvxCommand)
@project_path_option
@env_option
@pipeline_options
@dag_options
@_storage_root_option
@_strict_option
@click.pass_context
def upload_pipeline_command(ctx: click.Context, project_path: str | None, env: str | None, pipeline: str,
                            image: str | None, params: tuple[str, ...], load_versions: tuple[str, ...],
                            code_upload: bool | None, cache: str | None, operator: str, worker_project_path: str | None,
                            storage_root: str | None, strict: bool) -> None:
    """Compile the pipeline's DAG and put it in run_config.dags_folder; waits until Airflow has parsed it."""
    upload_dag(DagUploadRequest(
        at=invocation(ctx, project_path, env),
        options=PipelineOptions(pipeline, image, params, load_versions, code_upload, cache),
        dag=DagOptions(operator, worker_project_path), storage_root=storage_root, strict=strict,
    ))
