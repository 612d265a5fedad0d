"""``exec-node --serve-step``: the one step a planner puts in place of the steps it found in the
step cache before submitting a run (docs/cache.md), so that no machine starts for them.

The planner's verdict is a prediction made elsewhere (a laptop, with the environment an earlier
entry recorded); this step decides again where the steps really run. Every step the cache still
has is served in one session of the run (its outputs made this run's); a step that can no longer
be served (its entry expired, an input or the image changed since the plan) runs here, as its
own ``exec-node`` with the cache on, in the planner's order, so that the run's outputs never
depend on the prediction being right.
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import TYPE_CHECKING

from kvx_runtime.errors import ConfigError, ExitCode, KvxError, UsageError
from kvx_runtime.log import get_logger

if TYPE_CHECKING:
    from kvx_runtime.project import KedroProject
    from kvx_runtime.step.identity import JobDirectory, RunIdentity
    from kvx_runtime.step.invocation import ExecNodeInvocation
    from kvx_runtime.step.request import StepRequest

__all__ = ["ServedStepFailed", "check_serve_steps", "parse_serve_step", "serve_planned_steps", "serve_step_arg"]

log = get_logger(__name__)


class ServedStepFailed(KvxError):
    """A step planned as served could not be, and failed when it ran (its own exit code)."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        known = {code.value for code in ExitCode}
        self.exit_code = ExitCode(exit_code) if exit_code in known else ExitCode.NODE_FAILED


def serve_step_arg(nodes: tuple[str, ...] | list[str]) -> str:
    """A step's ``--serve-step`` value: its nodes as a JSON list (node names may hold commas)."""
    return json.dumps(list(nodes), separators=(",", ":"))


def parse_serve_step(text: str) -> tuple[str, ...]:
    """Read a ``--serve-step`` value (:func:`serve_step_arg`)."""
    try:
        nodes = json.loads(text)
    except json.JSONDecodeError:
        nodes = None
    if not isinstance(nodes, list) or not nodes or not all(isinstance(node, str) for node in nodes):
        raise UsageError(f"--serve-step {text[:80]!r} is not a JSON list of node names",
                         hint='e.g. --serve-step \'["split_data","train_model"]\'')
    return tuple(nodes)


def check_serve_steps(request: StepRequest) -> None:
    """The ``--serve-step`` groups must cover the ``--node`` list exactly, each node once."""
    listed = [node for nodes in request.serve_steps for node in nodes]
    if len(listed) != len(set(listed)) or set(listed) != set(request.nodes):
        raise UsageError("--serve-step groups must name every --node exactly once",
                         hint="each --serve-step is one step's nodes, as a JSON list")


def serve_planned_steps(project: KedroProject, request: StepRequest, identity: RunIdentity,
                        job_directory: JobDirectory, save_version: str | None) -> tuple[list[str], list[str]]:
    """Serve the steps of ``request.serve_steps``, run those that cannot be; returns (served, ran)."""
    from kvx_runtime.cache.key import step_identity
    from kvx_runtime.step.caching import serve_before_run

    if not job_directory.root:
        raise ConfigError("serving steps from the step cache needs a storage root",
                          hint="pass --storage-root or set run_config.root")
    steps = {step_identity(nodes): tuple(nodes) for nodes in request.serve_steps}
    code_identity = ""
    if request.code:
        from kvx_runtime.code_upload import parse_code_reference

        code_identity = parse_code_reference(request.code)[1]
    served = serve_before_run(project, request.pipeline, steps, job_directory.root, identity,
                              runtime_params=request.params, code_identity=code_identity,
                              load_versions=request.load_versions,
                              remember=False)  # a step's machine: no later command reads a memo here
    ran: list[str] = []
    for step, nodes in steps.items():
        if step in served:
            continue
        log.warning("a step planned as served from the step cache cannot be served here: it runs",
                    step=step, nodes=list(nodes))
        invocation = request.replay(run_id=identity.run_id, job_name=identity.job_name, env=project.env,
                                    storage_root=job_directory.root, save_version=save_version)
        _run_step(invocation.with_values(nodes=nodes, cache="on", serve_steps=(),
                                         mlflow_run_id=request.mlflow_run_id),
                  str(project.path) if request.project_path else None)
        ran.append(step)
    return list(served), ran


def _run_step(invocation: ExecNodeInvocation, project_path: str | None) -> None:
    """``invocation`` as a child ``exec-node`` (its log lines are this step's); stopped with
    this process when a signal ends it."""
    argv = [sys.executable, "-m", "kvx_runtime", *invocation.argv()[1:]]
    if project_path:
        argv += ["--project-path", project_path]
    process = subprocess.Popen(argv)
    try:
        code = process.wait()
    finally:
        if process.poll() is None:  # interrupted while it ran: it stops too
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
    if code != 0:
        raise ServedStepFailed(f"step {'+'.join(invocation.nodes)} (planned as served, run instead) "
                               f"failed with exit code {code}", code)
