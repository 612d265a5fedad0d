"""The ``kvx-runtime`` command line: the step commands (``exec-node``, ``mlflow-start``,
``mlflow-end``, ``fingerprint``) and the project commands shared with ``kedro vertexai``
(:mod:`kvx_runtime.commands`): the default target's at the top, every other target's under its
command group (``kvx-runtime kfp ...``). Every command is a :class:`~kvx_runtime.commands.KvxCommand`,
run under :func:`kvx_runtime.process.run_command`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import click

from kvx_runtime import __version__, settings
from kvx_runtime.commands import (
    KvxCommand,
    StepCommand,
    commands_for,
    env_option,
    kvx_group,
    load_version_option,
    project_path_option,
)
from kvx_runtime.log import configure_logging
from kvx_runtime.process import install_signal_handlers, run_unless_ok
from kvx_runtime.targets.registry import TARGETS

if TYPE_CHECKING:
    from kvx_runtime.project import KedroProject


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="kvx-runtime")
def cli() -> None:
    """Run Kedro nodes as Vertex AI / Kubeflow pipeline steps."""
    configure_logging()
    install_signal_handlers()
    if settings.HOST_ALIASES.get():
        from kvx_runtime.hosts import install_host_aliases

        run_unless_ok("host aliases", install_host_aliases)


for _target in TARGETS.values():
    if _target.command_group is None:  # the default target
        for _command in commands_for(_target):
            cli.add_command(_command)
    else:
        cli.add_command(kvx_group(_target))


@cli.command("exec-node", cls=StepCommand)
@click.option("--node", "nodes", multiple=True, required=True, metavar="NAME",
              help="Node to run; repeat for a group (run in one process, data in memory).")
@project_path_option
@env_option
@click.option("--pipeline", default="__default__", show_default=True, help="Registered pipeline the node(s) belong to.")
@click.option("--run-id", default=None,
              help="Pipeline run id (default: KEDRO_CONFIG_RUN_ID, then a generated local id).")
@click.option("--job-name", default=None, help="Pipeline job name (default: KEDRO_CONFIG_JOB_NAME, then the run id).")
@click.option("--storage-root", default=None,
              help="Root for intermediates: gs://bucket/prefix, file://..., or a path (default: run_config.root).")
@click.option("--param", "params", multiple=True, metavar="KEY=VALUE",
              help="Runtime parameter, typed from its Kedro value (str, int, float, bool, list, dict); dotted keys "
              "override nested ones. Repeatable.")
@click.option("--mlflow-run-id", default=None, help="MLflow run to log into (the pipeline's run).")
@click.option("--save-version", default=None, metavar="VERSION",
              help="The pipeline run's version for versioned datasets: a Kedro version or an RFC 3339 "
              "time (default: KVX_SAVE_VERSION, then --job-create-time, else one per process as in kedro run).")
@click.option("--job-create-time", default=None, metavar="RFC3339",
              help="The job's creation time (the spec passes the orchestrator's): the run's save version "
              "when --save-version is empty.")
@load_version_option
@click.option("--code", default=None, metavar="URI#sha256=DIGEST",
              help="Run the code and configuration of this archive (code upload; default: KVX_CODE).")
@click.option("--cache", type=click.Choice(["on", "off"]), default=None,
              help="Use the step cache (docs/cache.md): on a hit the outputs of an earlier run with the same key "
              "are this run's and the nodes do not run (default: run_config.cache.enabled, off).")
@click.option("--serve-step", "serve_steps", multiple=True, metavar="JSON",
              help="A step the planner found in the step cache (its nodes, a JSON list): served here, or run "
              "here if it can no longer be served; repeat per step, together covering the --node list "
              "(written by run-once --cache; docs/cache.md).")
def exec_node(
    nodes: tuple[str, ...],
    project_path: str | None,
    env: str | None,
    pipeline: str,
    run_id: str | None,
    job_name: str | None,
    storage_root: str | None,
    params: tuple[str, ...],
    mlflow_run_id: str | None,
    save_version: str | None,
    job_create_time: str | None,
    load_versions: tuple[str, ...],
    code: str | None,
    cache: str | None,
    serve_steps: tuple[str, ...],
) -> None:
    """Run one pipeline step: the named Kedro node(s), intermediates restored and saved."""
    from kvx_runtime.params import parse_params_before_typing
    from kvx_runtime.step.executor import execute_step
    from kvx_runtime.step.request import StepRequest
    from kvx_runtime.step.serving import parse_serve_step
    from kvx_runtime.versions import parse_load_versions

    execute_step(
        StepRequest(
            nodes=nodes,
            project_path=project_path,
            env=env,
            pipeline=pipeline,
            run_id=run_id,
            job_name=job_name,
            storage_root=storage_root,
            params=parse_params_before_typing(params),
            raw_params=params,
            mlflow_run_id=mlflow_run_id,
            save_version=save_version or settings.SAVE_VERSION.get() or None,
            job_create_time=job_create_time or None,
            load_versions=parse_load_versions(load_versions),
            code=code or settings.CODE.get() or None,
            cache=cache or settings.CACHE.get() or None,
            serve_steps=tuple(parse_serve_step(step) for step in serve_steps),
        )
    )


def _mlflow_project(project_path: str | None, env: str | None) -> KedroProject:
    from kvx_runtime.config import STEP_KEYS
    from kvx_runtime.errors import ConfigError
    from kvx_runtime.mlflow import mlflow_available
    from kvx_runtime.project import open_project

    if not mlflow_available():
        raise ConfigError("kedro-mlflow is not installed", hint='pip install "kvx-runtime[mlflow]"')
    return open_project(project_path, env, needed=STEP_KEYS)


@cli.command("mlflow-start", cls=StepCommand)
@click.option("--output", required=True, type=click.Path(dir_okay=False),
              help="File to write the MLflow run id to (its directory is created; a .json file gets a JSON "
              "string).")
@project_path_option
@env_option
@click.option("--run-id", default=None, help="Pipeline run id (default: KEDRO_CONFIG_RUN_ID).")
@click.option("--job-name", default=None, help="Pipeline job name (default: KEDRO_CONFIG_JOB_NAME, then the run id).")
@click.option("--kubeflow", is_flag=True, hidden=True,
              help="Run as under Kubeflow Pipelines (as KVX_ORCHESTRATOR=kubeflow; default: detected).")
def mlflow_start_command(output: str, project_path: str | None, env: str | None, run_id: str | None,
                         job_name: str | None, kubeflow: bool) -> None:
    """Create the pipeline's MLflow run; write its id to OUTPUT and print it."""
    from kvx_runtime.log import bind_step_context
    from kvx_runtime.mlflow import start_pipeline_run
    from kvx_runtime.step.identity import resolve_identity
    from kvx_runtime.step.orchestrator import KubeflowPipelines, current

    orchestrator = KubeflowPipelines() if kubeflow else current()
    identity = resolve_identity(run_id, job_name, orchestrator=orchestrator)
    identity.export()
    bind_step_context(node="mlflow-start-run", run_id=identity.run_id, job_name=identity.job_name)
    project = _mlflow_project(project_path, env)
    mlflow_run_id, _ = start_pipeline_run(project, identity.run_id, identity.job_name,
                                          tags=orchestrator.run_tags(identity.run_id))
    target = Path(output)
    target.parent.mkdir(parents=True, exist_ok=True)
    # A .json OUTPUT holds the id as a JSON string: Airflow's pod operator reads its XCom file as JSON.
    target.write_text(json.dumps(mlflow_run_id) if target.suffix == ".json" else mlflow_run_id)
    click.echo(mlflow_run_id)


@cli.command("mlflow-end", cls=StepCommand)
@click.option("--final-status", required=True, metavar="JSON",
              help='The pipeline\'s final status as Vertex passes it, e.g. {"state": "FAILED", "error": {...}}.')
@click.option("--mlflow-run-id", default=None, help="The run to end (default: found by --job-name).")
@click.option("--job-name", default=None,
              help="Find the run by its vertexai_job_name tag (default: KEDRO_CONFIG_JOB_NAME).")
@click.option("--run-id", default=None, help="Pipeline run id (on Kubeflow Pipelines part of the job's identity).")
@project_path_option
@env_option
def mlflow_end_command(final_status: str, mlflow_run_id: str | None, job_name: str | None, run_id: str | None,
                       project_path: str | None, env: str | None) -> None:
    """End the pipeline's MLflow run as FINISHED, FAILED or KILLED."""
    from kvx_runtime.log import bind_step_context
    from kvx_runtime.mlflow import end_pipeline_run, parse_final_status
    from kvx_runtime.step.identity import job_directory_name

    parse_final_status(final_status)  # bad input fails before any network call
    job = job_directory_name(run_id, job_name)
    bind_step_context(node="mlflow-end-run", job_name=job)
    project = _mlflow_project(project_path, env)
    ended, status = end_pipeline_run(project, final_status, mlflow_run_id=mlflow_run_id, job_name=job)
    click.echo(f"{ended} {status}")


@cli.command("fingerprint", cls=StepCommand)
@project_path_option
def fingerprint_command(project_path: str | None) -> None:
    """Print the fingerprint of the project's declared requirements (what code upload checks)."""
    from kvx_runtime.code_upload import requirements_fingerprint

    click.echo(requirements_fingerprint(Path(project_path or os.getcwd())))


@cli.command("slim-packages", cls=KvxCommand)
@click.argument("site_packages", nargs=-1, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--no-strip", is_flag=True,
              help="Keep extension modules' debug info and symbol tables (remove only files no step reads).")
def slim_packages_command(site_packages: tuple[Path, ...], no_strip: bool) -> None:
    """Remove what no step loads from an image's Python environment: packages' test suites,
    type stubs, Cython sources, and extension modules' debug info and static symbol tables
    (docs/images.md). Default: this interpreter's site-packages."""
    from kvx_runtime.image_slim import default_site_packages, slim_site_packages

    report = slim_site_packages(site_packages or default_site_packages(), strip=not no_strip)
    for line in report.lines():
        click.echo(line)


def main() -> None:
    """The program: :func:`kvx_runtime.entry.main` (stop signals handled from its first line)."""
    from kvx_runtime.entry import main as program

    program()
