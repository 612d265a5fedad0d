"""The pipeline plan: what a compiled pipeline runs, before any target's format.

A :class:`PipelinePlan` holds the steps (their nodes, dependencies, resources, retries,
environment and command line), the pipeline parameters and the run's values. The planner
(:mod:`.planner`) makes it once; a renderer turns it into a target's format (:mod:`.kfp_render`:
the KFP pipeline spec Vertex AI and Kubeflow Pipelines run).

Values the orchestrator knows only when a run starts (the run id, the job's name, a pipeline
parameter's value for this run, ...) appear in the command lines as markers, ``<kvx:run_id>``
or ``<kvx:param:NAME>``: each renderer maps them to its own syntax, and refuses a marker it
does not know. No Kedro name or version holds ``<kvx:``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from enum import Enum
from pathlib import Path
from typing import Any, TypeAlias

from kvx_runtime.compiler.resources import StepResources
from kvx_runtime.config import RetrySpec
from kvx_runtime.step.invocation import PROGRAM, ExecNodeInvocation

__all__ = [
    "MLFLOW_END_STEP",
    "MLFLOW_START_STEP",
    "ON_EXIT_STEP",
    "CodeUpload",
    "ParameterRef",
    "PipelineParameter",
    "PipelinePlan",
    "PlannedStep",
    "Reference",
    "StepKind",
    "Symbol",
    "fill",
    "references",
]


class Symbol(str, Enum):
    """A value that only the orchestrator running the pipeline knows (or a step produces)."""

    #: The run's unique id (a job's uuid).
    RUN_ID = "run_id"
    #: The job's name as the orchestrator shows it.
    JOB_NAME = "job_name"
    #: When the job was created (the run's save version unless SAVE_VERSION is set).
    JOB_CREATE_TIME = "job_create_time"
    #: The run's storage root: the plan's, unless the run sets another.
    STORAGE_ROOT = "storage_root"
    #: The run's save version where the submitter sets one; empty otherwise.
    SAVE_VERSION = "save_version"
    #: The MLflow run id the MLflow start step produced.
    MLFLOW_RUN_ID = "mlflow_run_id"
    #: Where the MLflow start step writes that id.
    MLFLOW_RUN_ID_OUTPUT = "mlflow_run_id_output"
    #: The outcome of the pipeline's body, given to the steps that run after it.
    FINAL_STATUS = "final_status"

    @property
    def marker(self) -> str:
        return f"<kvx:{self.value}>"


@dataclass(frozen=True)
class ParameterRef:
    """This run's value of the pipeline parameter ``name``."""

    name: str

    @property
    def marker(self) -> str:
        return f"<kvx:param:{self.name}>"


Reference: TypeAlias = Symbol | ParameterRef
_MARKER = re.compile(r"<kvx:(param:)?([A-Za-z0-9_]+)>")


def _reference(match: re.Match[str]) -> Reference:
    if match.group(1):
        return ParameterRef(match.group(2))
    try:
        return Symbol(match.group(2))
    except ValueError:
        raise ValueError(f"unknown marker {match.group(0)!r} in a plan") from None


def references(text: str) -> list[Reference]:
    """The markers in ``text``, in order."""
    return [_reference(match) for match in _MARKER.finditer(text)]


def fill(text: str, value_of: Callable[[Reference], str]) -> str:
    """``text`` with every marker replaced by ``value_of`` its reference."""
    return _MARKER.sub(lambda match: value_of(_reference(match)), text)


@dataclass(frozen=True)
class PipelineParameter:
    """A Kedro parameter exposed as a pipeline parameter (overridable per run)."""

    kedro_name: str
    name: str
    type: str  # its kind in kvx_runtime.params' table
    default: Any


#: The names of the runtime's own steps (node steps never take them: names.RESERVED).
MLFLOW_START_STEP = "mlflow-start-run"
MLFLOW_END_STEP = "mlflow-end-run"
ON_EXIT_STEP = "on-exit"
#: The step that serves the steps a planner found in the step cache (``exec-node --serve-step``).
CACHE_SERVE_STEP = "cache-serve"
#: The Airflow DAG's task that gives the run the body's outcome once the exit tasks have run.
OUTCOME_TASK = "pipeline-outcome"


class StepKind(str, Enum):
    #: ``exec-node`` over a group of the pipeline's nodes.
    NODES = "nodes"
    #: Opens the pipeline's one MLflow run, before every node step.
    MLFLOW_START = "mlflow-start"
    #: Closes it once the body has finished, whatever its outcome.
    MLFLOW_END = "mlflow-end"
    #: ``exec-node`` over ``run_config.on_exit_pipeline``, once the body has finished.
    ON_EXIT = "on-exit"


@dataclass(frozen=True)
class PlannedStep:
    """One step of the plan: ``kvx-runtime <command>`` with its flags, and how it runs."""

    name: str
    kind: StepKind
    command: str
    #: exec-node's flags (NODES and ON_EXIT); the other commands' flags are in ``flags``.
    invocation: ExecNodeInvocation | None = None
    flags: tuple[str, ...] = ()
    #: Steps of the body this one waits for.
    after: tuple[str, ...] = ()
    resources: StepResources | None = None
    retry: RetrySpec | None = None
    env: Mapping[str, str] = field(default_factory=dict)

    @property
    def nodes(self) -> tuple[str, ...]:
        return self.invocation.nodes if self.invocation is not None else ()

    def args(self) -> list[str]:
        return self.invocation.args() if self.invocation is not None else list(self.flags)

    def argv(self) -> list[str]:
        return [PROGRAM, self.command, *self.args()]

    def references(self) -> list[Reference]:
        """The orchestrator's values this step's command line uses, in order."""
        return [reference for arg in self.args() for reference in references(arg)]


@dataclass(frozen=True)
class CodeUpload:
    """The workspace's code and configuration that the upload phase packages for the steps."""

    project_path: Path
    package_name: str
    conf_root: Path


@dataclass(frozen=True)
class PipelinePlan:
    name: str
    description: str | None
    image: str
    storage_root: str
    failure_policy: str
    #: The body: the MLflow start step (if any), then the node steps in dependency order.
    steps: tuple[PlannedStep, ...]
    #: Steps that run once the body has finished, whatever its outcome (they may read FINAL_STATUS).
    exit_steps: tuple[PlannedStep, ...]
    parameters: tuple[PipelineParameter, ...]
    #: This run's pipeline parameter values (by parameter name), typed.
    values: Mapping[str, Any]
    warnings: tuple[str, ...]
    #: ``run_config.kubernetes``: pod settings for targets that run steps as Kubernetes pods.
    kubernetes: Any
    #: What to package and upload before rendering; None once uploaded (or when not asked).
    code_upload: CodeUpload | None = None
    #: Nodes a resumed run finished: no step runs them, their outputs are there.
    finished_nodes: tuple[str, ...] = ()
    #: Pipeline inputs read from under a cloud storage root, by catalog name: their paths,
    #: which compiling does not look for (a run about to be submitted does).
    remote_inputs: Mapping[str, str] = field(default_factory=dict)
    #: The steps (:func:`kvx_runtime.cache.key.step_identity`) a resumed run finished that are
    #: left out: what the run's spec records as finished.
    finished_steps: tuple[str, ...] = ()
    #: Blobs of a resumed run that its steps left to run read (written by steps it finished):
    #: dataset identity -> the finished step that wrote it.
    kept_blobs: Mapping[str, str] = field(default_factory=dict)

    @property
    def node_steps(self) -> tuple[PlannedStep, ...]:
        return tuple(step for step in self.steps if step.kind is StepKind.NODES)

    @property
    def mlflow(self) -> bool:
        return any(step.kind is StepKind.MLFLOW_START for step in self.steps)

    @property
    def nodes_of_step(self) -> dict[str, tuple[str, ...]]:
        """Node step name -> its nodes, in dependency order."""
        return {step.name: step.nodes for step in self.node_steps}

    def with_code(self, reference: str) -> PipelinePlan:
        """The plan whose exec-node steps run the uploaded code archive ``reference``."""

        def uploaded(step: PlannedStep) -> PlannedStep:
            if step.invocation is None:
                return step
            return replace(step, invocation=step.invocation.with_values(code=reference))

        return replace(self, steps=tuple(map(uploaded, self.steps)),
                       exit_steps=tuple(map(uploaded, self.exit_steps)), code_upload=None)
