"""``kvx-runtime plan`` (and ``kedro vertexai plan``, ...): which steps of the next run the step
cache would serve, and for each miss what changed (docs/cache.md)."""

from __future__ import annotations

from dataclasses import dataclass

import click

from kvx_runtime.commands.command import Invocation, KvxCommand, invocation
from kvx_runtime.commands.options import env_option, load_version_option, project_path_option

__all__ = ["PlanRequest", "plan_command", "show_plan"]


@dataclass(frozen=True)
class PlanRequest:
    at: Invocation
    pipeline: str = "__default__"
    storage_root: str | None = None
    #: ``KEY=VALUE``: the run's Kedro parameters (typed as exec-node types them).
    values: tuple[str, ...] = ()
    #: ``DATASET=VERSION``: the versions the run pins (``--load-version``).
    load_versions: tuple[str, ...] = ()


def show_plan(request: PlanRequest) -> None:
    """Print a line per step: HIT (the run it comes from), MISS (why; the parts that changed)
    or RUNS (not cacheable, and why)."""
    from kvx_runtime.cache.planning import run_verdicts
    from kvx_runtime.commands.project import PipelineOptions, compile_request
    from kvx_runtime.compiler.loading import load_project_facts
    from kvx_runtime.compiler.planner import plan_pipeline
    from kvx_runtime.config import local_storage_root, resolve_storage_root
    from kvx_runtime.params import typed_params
    from kvx_runtime.project import open_project
    from kvx_runtime.versions import parse_load_versions

    project = open_project(request.at.project_path, request.at.env)
    root = resolve_storage_root(request.storage_root, project.plugin_config.run_config.root, required=True,
                                default=local_storage_root(project.path))
    assert root is not None
    # Planned as a run with the cache on (what plan predicts), the pipeline memo included.
    compile_at = compile_request(request.at, PipelineOptions(request.pipeline, image="plan", cache="on"), root,
                                 project=project)
    facts = load_project_facts(compile_at)
    steps = plan_pipeline(compile_at, facts).nodes_of_step
    params = typed_params(request.values, facts.kedro_params)
    predicted = run_verdicts(project, request.pipeline, steps, params, root,
                             load_versions=parse_load_versions(request.load_versions))
    found = predicted.verdicts
    where = "" if predicted.recorded_by is None else \
        f", in the environment of run {predicted.recorded_by} (where the steps ran, not here)"
    click.echo(f"Step cache under {root} for pipeline {request.pipeline} (env {project.env}{where}): "
               f"{len(predicted.hits)} of {len(found)} steps would be served")
    width = max(len(verdict.step) for verdict in found)
    for verdict in found:
        if verdict.hit:
            assert verdict.entry is not None
            line = f"HIT   {verdict.step:<{width}}  from run {verdict.entry.run_id} ({verdict.entry.created[:19]})"
        elif not verdict.key.cacheable:
            line = f"RUNS  {verdict.step:<{width}}  not cacheable: {'; '.join(verdict.key.uncacheable)}"
        else:
            changed = f"; changed: {', '.join(verdict.changed)}" if verdict.changed else ""
            line = f"MISS  {verdict.step:<{width}}  {verdict.reason}{changed}"
        click.echo(line)


@click.command("plan", cls=KvxCommand)
@project_path_option
@env_option
@click.option("-p", "--pipeline", default="__default__", show_default=True, help="Registered pipeline.")
@click.option("--storage-root", default=None,
              help="Storage root whose cache to look in (default: run_config.root, else <project>/.kvx/storage, "
              "run-local's).")
@click.option("--param", "values", multiple=True, metavar="KEY=VALUE",
              help="A Kedro parameter of the run (typed as exec-node types it). Repeatable.")
@load_version_option
@click.pass_context
def plan_command(ctx: click.Context, project_path: str | None, env: str | None, pipeline: str,
                 storage_root: str | None, values: tuple[str, ...], load_versions: tuple[str, ...]) -> None:
    """Say which steps of a run the step cache would serve, and why each other step runs."""
    show_plan(PlanRequest(invocation(ctx, project_path, env), pipeline, storage_root, values, load_versions))
