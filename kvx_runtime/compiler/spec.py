"""Building the pipeline spec (KFP IR, ``PipelineSpec`` schemaVersion 2.1.0) as plain dicts,
from the tasks :mod:`.kfp_render` makes of a plan's steps.

Shape (see ``../shared/reference/kfp/`` for what the kfp SDK emits for the same features):

- one component + executor + task per step; the executor calls ``kvx-runtime exec-node`` as
  an argv list, with the run id, job name, storage root and pipeline parameters as
  placeholders;
- with MLflow, a ``mlflow-start-run`` task first (its run id goes to every step) and the
  steps inside an exit handler whose closing task ``mlflow-end-run`` receives the pipeline's
  final status; ``on_exit_pipeline`` runs in the exit handler too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from kvx_runtime.compiler.plan import MLFLOW_START_STEP, PipelineParameter
from kvx_runtime.params import SPEC_TYPES

#: A pipeline parameter: the run's save version when the orchestrator does not fill the
#: create-time placeholder (KFP); empty = the job's creation time.
from kvx_runtime.versions import SAVE_VERSION_PARAMETER

SCHEMA_VERSION = "2.1.0"


def executor_label(task: str) -> str:
    """The label of a task's executor in ``deploymentSpec`` (and in the platform spec)."""
    return f"exec-{task}"

STORAGE_ROOT_PARAMETER = "kvx_storage_root"
#: A pipeline parameter no task reads: the failure policy that run-local applies and that a
#: submitted job carries as runtimeConfig.failurePolicy (the spec itself has no such field).
FAILURE_POLICY_PARAMETER = "kvx_failure_policy"
FAILURE_POLICIES = ("fail_slow", "fail_fast")
MLFLOW_RUN_ID = "mlflow_run_id"
#: A task input fed the job's creation time (the run's save version for versioned datasets).
JOB_CREATE_TIME = "kvx_job_create_time"
JOB_CREATE_TIME_PLACEHOLDER = "{{$.pipeline_job_create_time_utc}}"
#: Task inputs fed the job's name and uuid.
JOB_NAME = "kvx_job_name"
JOB_UUID = "kvx_job_uuid"
#: The orchestrator's values, passed as the kfp SDK passes dsl.PIPELINE_JOB_*_PLACEHOLDER: as
#: task input constants, which Vertex AI and KFP (>= 2.4) resolve when the task starts. KFP's
#: launcher does not resolve them inside container args, so args only ever name the inputs.
RUNTIME_PLACEHOLDERS = {
    JOB_CREATE_TIME: JOB_CREATE_TIME_PLACEHOLDER,
    JOB_NAME: "{{$.pipeline_job_name}}",
    JOB_UUID: "{{$.pipeline_job_uuid}}",
}

FINAL_STATUS = "status"
EXIT_HANDLER = "exit-handler-1"
CHANNEL = "pipelinechannel--"

#: A parameter kind -> its pipeline spec type (the one typing table: kvx_runtime.params).
PARAMETER_TYPES = SPEC_TYPES


@dataclass
class Step:
    """One task of the spec: a group of Kedro nodes, or one of the compiler's own tasks."""

    task: str
    display_name: str
    command: list[str]
    args: list[str]
    inputs: dict[str, str] = field(default_factory=dict)  # input name -> parameter type
    outputs: dict[str, str] = field(default_factory=dict)
    depends_on: list[str] = field(default_factory=list)
    resources: dict[str, Any] = field(default_factory=dict)
    retry: dict[str, Any] | None = None
    env: dict[str, str] = field(default_factory=dict)
    uses_mlflow_run: bool = False
    uses_parameters: bool = False
    final_status: bool = False


def placeholder(name: str) -> str:
    return "{{$.inputs.parameters['%s']}}" % name


def output_file(name: str) -> str:
    return "{{$.outputs.parameters['%s'].output_file}}" % name


@dataclass
class SpecBuilder:
    name: str
    description: str | None
    image: str
    parameters: Sequence[PipelineParameter]
    storage_root: str
    mlflow: bool
    has_exit_handler: bool
    failure_policy: str = "fail_slow"

    def build(self, node_steps: Sequence[Step], start: Step | None, exit_steps: Sequence[Step]) -> dict[str, Any]:
        components: dict[str, Any] = {}
        executors: dict[str, Any] = {}
        inner_tasks: dict[str, Any] = {}
        root_tasks: dict[str, Any] = {}

        body = [*([start] if start else []), *node_steps]
        inside = self.has_exit_handler
        for step in body:
            components[f"comp-{step.task}"] = self._component(step)
            executors[executor_label(step.task)] = self._executor(step)
            (inner_tasks if inside else root_tasks)[step.task] = self._task(step, inside=inside)
        for step in exit_steps:
            components[f"comp-{step.task}"] = self._component(step)
            executors[executor_label(step.task)] = self._executor(step)
            root_tasks[step.task] = self._task(step, inside=False)

        if inside:
            components[f"comp-{EXIT_HANDLER}"] = {
                "dag": {"tasks": inner_tasks},
                "inputDefinitions": {"parameters": {
                    CHANNEL + name: {"parameterType": kind} for name, kind in self._pipeline_inputs().items()
                }},
            }
            root_tasks[EXIT_HANDLER] = {
                "componentRef": {"name": f"comp-{EXIT_HANDLER}"},
                "inputs": {"parameters": {
                    CHANNEL + name: {"componentInputParameter": name} for name in self._pipeline_inputs()
                }},
                "taskInfo": {"name": "kedro-nodes"},
            }

        spec: dict[str, Any] = {
            "components": dict(sorted(components.items())),
            "deploymentSpec": {"executors": dict(sorted(executors.items()))},
            "pipelineInfo": {"name": self.name},
            "root": {
                "dag": {"tasks": dict(sorted(root_tasks.items()))},
                "inputDefinitions": {"parameters": self._root_input_definitions()},
            },
            "schemaVersion": SCHEMA_VERSION,
            "sdkVersion": _sdk_version(),
        }
        if self.description:
            spec["pipelineInfo"]["description"] = self.description
        return spec

    # --- pieces -------------------------------------------------------------------------

    def _pipeline_inputs(self) -> dict[str, str]:
        return parameter_inputs(self.parameters)

    def _root_input_definitions(self) -> dict[str, Any]:
        definitions: dict[str, Any] = {
            STORAGE_ROOT_PARAMETER: {
                "defaultValue": self.storage_root,
                "isOptional": True,
                "parameterType": "STRING",
            }
        }
        definitions[SAVE_VERSION_PARAMETER] = {
            "defaultValue": "",
            "description": "The run's version for Kedro's versioned datasets (a Kedro version or an RFC 3339 "
            "time); empty: the job's creation time. Submitters set it where the orchestrator does not fill "
            "pipeline_job_create_time_utc.",
            "isOptional": True,
            "parameterType": "STRING",
        }
        definitions[FAILURE_POLICY_PARAMETER] = {
            "defaultValue": self.failure_policy,
            "description": "After a step fails: fail_slow lets independent steps finish (Vertex AI's "
            "default), fail_fast starts no new step. Read by run-local and by job submission.",
            "isOptional": True,
            "parameterType": "STRING",
        }
        for parameter in self.parameters:
            definitions[parameter.name] = {
                "defaultValue": parameter.default,
                "isOptional": True,
                "parameterType": PARAMETER_TYPES[parameter.type],
            }
        return definitions

    def _component(self, step: Step) -> dict[str, Any]:
        component: dict[str, Any] = {"executorLabel": executor_label(step.task)}
        if step.inputs:
            definitions = {}
            for name, kind in sorted(step.inputs.items()):
                definition: dict[str, Any] = {"parameterType": kind}
                if kind == "TASK_FINAL_STATUS":
                    definition["isOptional"] = True
                definitions[name] = definition
            component["inputDefinitions"] = {"parameters": definitions}
        if step.outputs:
            component["outputDefinitions"] = {"parameters": {
                name: {"parameterType": kind} for name, kind in sorted(step.outputs.items())
            }}
        return component

    def _executor(self, step: Step) -> dict[str, Any]:
        container: dict[str, Any] = {"image": self.image, "command": step.command, "args": step.args}
        if step.env:
            container["env"] = [{"name": k, "value": v} for k, v in sorted(step.env.items())]
        if step.resources:
            container["resources"] = step.resources
        return {"container": container}

    def _task(self, step: Step, *, inside: bool) -> dict[str, Any]:
        prefix = CHANNEL if inside else ""
        parameters: dict[str, Any] = {}
        for name in step.inputs:
            if name == MLFLOW_RUN_ID:
                parameters[name] = {"taskOutputParameter": {
                    "outputParameterKey": MLFLOW_RUN_ID, "producerTask": MLFLOW_START_STEP}}
            elif name == FINAL_STATUS:
                parameters[name] = {"taskFinalStatus": {"producerTask": EXIT_HANDLER}}
            elif name in RUNTIME_PLACEHOLDERS:
                parameters[name] = {"runtimeValue": {"constant": RUNTIME_PLACEHOLDERS[name]}}
            else:
                parameters[name] = {"componentInputParameter": prefix + name}
        task: dict[str, Any] = {
            "cachingOptions": {},  # caching off: steps have side effects (storage, MLflow)
            "componentRef": {"name": f"comp-{step.task}"},
            "taskInfo": {"name": step.display_name},
        }
        if parameters:
            task["inputs"] = {"parameters": dict(sorted(parameters.items()))}
        if step.depends_on:
            task["dependentTasks"] = sorted(set(step.depends_on))
        if step.retry:
            task["retryPolicy"] = step.retry
        if step.final_status:
            task["triggerPolicy"] = {"strategy": "ALL_UPSTREAM_TASKS_COMPLETED"}
        return task


def parameter_inputs(parameters: Sequence[PipelineParameter]) -> dict[str, str]:
    inputs = {STORAGE_ROOT_PARAMETER: "STRING", SAVE_VERSION_PARAMETER: "STRING"}
    inputs.update({p.name: PARAMETER_TYPES[p.type] for p in parameters})
    return inputs


def _sdk_version() -> str:
    from kvx_runtime import __version__

    return f"kvx-runtime-{__version__}"


def retry_policy(spec: Any) -> dict[str, Any] | None:
    if spec is None or spec.max_retry_count <= 0:
        return None
    return {
        "backoffDuration": spec.backoff_duration,
        "backoffFactor": float(spec.backoff_factor),
        "backoffMaxDuration": spec.backoff_max_duration,
        "maxRetryCount": spec.max_retry_count,
    }
