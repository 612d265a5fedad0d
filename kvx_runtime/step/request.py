"""What ``exec-node`` is asked (:class:`StepRequest`) and what it reports (:class:`StepResult`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvx_runtime.step.invocation import DEFAULT_PIPELINE, ExecNodeInvocation

__all__ = ["StepRequest", "StepResult"]


@dataclass
class StepRequest:
    """Everything ``exec-node`` was asked to do (flags already merged with the environment)."""

    nodes: Sequence[str]
    project_path: str | Path | None = None
    env: str | None = None
    pipeline: str = DEFAULT_PIPELINE
    run_id: str | None = None
    job_name: str | None = None
    storage_root: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    raw_params: Sequence[str] = ()
    mlflow_run_id: str | None = None
    #: The pipeline run's save version (Kedro format or an RFC 3339 time), see kvx_runtime.versions.
    save_version: str | None = None
    #: The job's creation time as the orchestrator filled it in: the save version without one.
    job_create_time: str | None = None
    #: Explicit load versions (dataset -> Kedro version); they win over the run's version.
    load_versions: dict[str, str] = field(default_factory=dict)
    #: A code archive to run instead of the image's code: ``<uri>#sha256=<digest>``.
    code: str | None = None
    #: ``on``/``off``: the step cache for this run; None: ``run_config.cache.enabled``.
    cache: str | None = None
    #: Steps to serve from the step cache, each its nodes (``--serve-step``; docs/cache.md).
    serve_steps: tuple[tuple[str, ...], ...] = ()

    def replay(self, *, run_id: str, job_name: str, env: str, storage_root: str | None,
               save_version: str | None) -> ExecNodeInvocation:
        """This step as it really ran (its resolved identity, env, root and version): the
        command that re-runs it elsewhere against the same storage root."""
        return ExecNodeInvocation(
            nodes=tuple(self.nodes), pipeline=self.pipeline, env=env, run_id=run_id, job_name=job_name,
            storage_root=storage_root, save_version=save_version,
            load_versions=ExecNodeInvocation.load_version_items(self.load_versions),
            code=self.code, params=tuple(self.raw_params), cache=self.cache,
        )


@dataclass
class StepResult:
    run_id: str
    job_name: str
    nodes: tuple[str, ...]
    stored: tuple[str, ...]
    loaded: tuple[str, ...]
    seconds: float
