"""What ``run-once --cache`` (every target) leaves out of the run it submits: the steps the step
cache already has (docs/cache.md), so that no machine starts for them.

The verdicts are predicted here (:func:`kvx_runtime.cache.planning.run_verdicts`: the steps'
keys as they will compute them, in the environment their last entries recorded); the compiled
run serves those steps in one ``cache-serve`` step, which checks again where it runs and runs
any step that can no longer be served. With uploaded code the keys count the archive the steps
will run (built here first: it is deterministic, so the compile builds the same one).
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import click

from kvx_runtime.log import get_logger

if TYPE_CHECKING:
    from kvx_runtime.compiler import CompileRequest
    from kvx_runtime.project import KedroProject

__all__ = ["with_cached_steps_served"]

log = get_logger(__name__)


def with_cached_steps_served(project: KedroProject, request: CompileRequest) -> CompileRequest:
    """``request`` with the steps the step cache has marked as served (and every step's cache
    on), when the cache is wanted; what it found said in a line."""
    from kvx_runtime.step.caching import cache_wanted

    if not cache_wanted(project, request.cache):
        return request
    request = replace(request, cache="on")
    from kvx_runtime.cache.planning import run_verdicts
    from kvx_runtime.compiler.loading import load_project_facts
    from kvx_runtime.compiler.planner import plan_pipeline
    from kvx_runtime.params import typed_params

    facts = load_project_facts(request)
    plan = plan_pipeline(request, facts)
    steps = plan.nodes_of_step
    code_identity = ""
    if plan.code_upload is not None:  # the archive the steps will run: deterministic, so its digest is known now
        from kvx_runtime.code_upload import build_archive

        source = plan.code_upload
        code_identity = build_archive(source.project_path, source.package_name, source.conf_root).digest
    params = typed_params([f"{key}={value}" for key, value in request.values.items()], facts.kedro_params)
    found = run_verdicts(project, request.pipeline, steps, params, facts.storage_root, code_identity,
                         load_versions=request.load_versions)
    hits = found.hits
    if not hits:
        click.echo(f"Step cache: none of the {len(steps)} steps found under {facts.storage_root}: every step runs")
        return request
    where = "" if found.recorded_by is None else f", in the environment run {found.recorded_by} recorded"
    click.echo(f"Step cache: {len(hits)} of {len(steps)} steps found under {facts.storage_root}{where}: "
               "left out of the run, one cache-serve step serves them (and runs any it cannot serve)")
    log.info("steps served by the cache-serve step", steps=[verdict.step for verdict in hits])
    return replace(request, served_steps=frozenset(verdict.key.step for verdict in hits))
