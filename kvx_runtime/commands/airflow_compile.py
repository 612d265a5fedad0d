"""``kvx-runtime airflow compile`` / ``kedro airflow-k8s compile``: the project's pipeline as
one Airflow DAG file (the Airflow target's own ``compile``, replacing the shared one), and the
options and compile step every Airflow command that makes a DAG shares."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from kvx_runtime.commands.command import Invocation, KvxCommand, invocation
from kvx_runtime.commands.options import _apply, env_option, pipeline_options, project_path_option
from kvx_runtime.commands.project import PipelineOptions, compile_request, refuse_warnings
from kvx_runtime.errors import UsageError

if TYPE_CHECKING:
    from kvx_runtime.compiler.compiler import CompiledDag
    from kvx_runtime.project import KedroProject

__all__ = ["CompileDagRequest", "DagOptions", "compile_command", "compile_dag_file", "compile_dag_for",
           "dag_options"]


@dataclass(frozen=True)
class DagOptions:
    """How the DAG's tasks run (``--operator``, ``--worker-project-path``)."""

    operator: str = "pods"
    #: Where the project lives on the Airflow worker (local operator; default: here, absolute).
    worker_project_path: str | None = None


def dag_options(function: Callable[..., Any]) -> Callable[..., Any]:
    """``--operator`` and ``--worker-project-path`` (:class:`DagOptions`)."""
    return _apply([
        click.option("--operator", type=click.Choice(["pods", "local"]), default="pods", show_default=True,
                     help="pods: each task a KubernetesPodOperator running the image; local: each task a "
                     "subprocess of the Airflow worker (BashOperator) in the project's directory."),
        click.option("--worker-project-path", default=None, metavar="DIR",
                     help="With --operator local: the project's directory on the worker (default: this "
                     "project's absolute path)."),
    ], function)


def compile_dag_for(at: Invocation, options: PipelineOptions, dag: DagOptions, storage_root: str | None,
                    values: tuple[str, ...] = (), *, strict: bool = False, run_once: bool = False,
                    overrides: Mapping[str, Any] | None = None, serving: KedroProject | None = None,
                    project: KedroProject | None = None, published_schedule: bool = False) -> CompiledDag:
    """The project's pipeline compiled into a DAG (``--strict``: no warning allowed;
    ``run_once``, ``overrides``: see :func:`kvx_runtime.compiler.compile_dag`; ``serving`` and
    ``project``: see :func:`~.project.compile_for`)."""
    from kvx_runtime.compiler import compile_dag

    if dag.worker_project_path and dag.operator != "local":
        raise UsageError("--worker-project-path is for --operator local (pods run the project from their image)")
    compiled = compile_dag(compile_request(at, options, storage_root, values, serving=serving, project=project),
                           operator="local" if dag.operator == "local" else "pods",
                           project_dir=dag.worker_project_path, run_once=run_once, overrides=overrides,
                           published_schedule=published_schedule)
    if strict:
        refuse_warnings(compiled.warnings, "DAG")
    return compiled


@dataclass(frozen=True)
class CompileDagRequest:
    at: Invocation
    options: PipelineOptions = field(default_factory=PipelineOptions)
    storage_root: str | None = None
    values: tuple[str, ...] = ()
    output: str | None = None
    dag: DagOptions = field(default_factory=DagOptions)
    strict: bool = False


def compile_dag_file(request: CompileDagRequest) -> Path:
    """Compile the project's pipeline into a DAG file; returns the file written."""
    from kvx_runtime.compiler.airflow_render import write_dag

    compiled = compile_dag_for(request.at, request.options, request.dag, request.storage_root, request.values,
                               strict=request.strict)
    path = write_dag(compiled.dag, request.output or f"{compiled.dag.dag_id}.py")
    tasks = len(compiled.dag.upstream)
    click.echo(f"Airflow DAG {compiled.dag.dag_id} with {tasks} task{'s' if tasks != 1 else ''} "
               f"({len(compiled.steps)} node step{'s' if len(compiled.steps) != 1 else ''}) written to {path}")
    return path


@click.command("compile", cls=KvxCommand)
@project_path_option
@env_option
@pipeline_options
@click.option("--storage-root", default=None, help="Default storage root of the runs (default: run_config.root).")
@click.option("--param", "values", multiple=True, metavar="KEY=VALUE",
              help="Default of a Kedro parameter in the DAG's params (a run's conf overrides it). Repeatable.")
@click.option("-o", "--output", default=None, help="Where to write the DAG file (default: <dag_id>.py).")
@dag_options
@click.option("--strict", is_flag=True,
              help="Exit 2 on any warning (a trap that would fail in the cluster), writing no DAG: for CI.")
@click.pass_context
def compile_command(ctx: click.Context, project_path: str | None, env: str | None, pipeline: str,
                    image: str | None, params: tuple[str, ...], load_versions: tuple[str, ...],
                    code_upload: bool | None, cache: str | None, storage_root: str | None, values: tuple[str, ...],
                    output: str | None, operator: str, worker_project_path: str | None, strict: bool) -> None:
    """Compile a Kedro pipeline into an Airflow 3 DAG file whose tasks run kvx-runtime exec-node."""
    compile_dag_file(CompileDagRequest(
        at=invocation(ctx, project_path, env),
        options=PipelineOptions(pipeline, image, params, load_versions, code_upload, cache),
        storage_root=storage_root, values=values, output=output,
        dag=DagOptions(operator, worker_project_path), strict=strict,
    ))
