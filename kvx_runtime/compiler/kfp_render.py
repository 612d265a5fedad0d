"""Rendering a :class:`~.plan.PipelinePlan` as a KFP pipeline spec (what Vertex AI and Kubeflow
Pipelines run) and its Kubernetes platform spec.

The plan's markers become task inputs: the orchestrator's values are task input constants
(``{{$.pipeline_job_uuid}}`` and the like, see :mod:`.spec`), the run's storage root, save
version and parameters are pipeline parameters, the MLflow run id is the start task's output
parameter and the final status the exit handler's. Container args only ever name inputs and
outputs, the only placeholders KFP's launcher resolves there.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kvx_runtime.compiler.checks import check_references
from kvx_runtime.compiler.plan import ParameterRef, PipelinePlan, PlannedStep, Reference, Symbol, fill
from kvx_runtime.compiler.platform import kubernetes_platform_spec
from kvx_runtime.compiler.spec import (
    EXIT_HANDLER,
    FINAL_STATUS,
    JOB_CREATE_TIME,
    JOB_NAME,
    JOB_UUID,
    MLFLOW_RUN_ID,
    PARAMETER_TYPES,
    SAVE_VERSION_PARAMETER,
    STORAGE_ROOT_PARAMETER,
    SpecBuilder,
    Step,
    executor_label,
    output_file,
    placeholder,
    retry_policy,
)
from kvx_runtime.step.invocation import PROGRAM

__all__ = ["KfpPipeline", "render_kfp"]

#: The plan's symbols a step reads: the task input each one becomes, and its type.
_INPUTS: dict[Symbol, tuple[str, str]] = {
    Symbol.RUN_ID: (JOB_UUID, "STRING"),
    Symbol.JOB_NAME: (JOB_NAME, "STRING"),
    Symbol.JOB_CREATE_TIME: (JOB_CREATE_TIME, "STRING"),
    Symbol.STORAGE_ROOT: (STORAGE_ROOT_PARAMETER, "STRING"),
    Symbol.SAVE_VERSION: (SAVE_VERSION_PARAMETER, "STRING"),
    Symbol.MLFLOW_RUN_ID: (MLFLOW_RUN_ID, "STRING"),
    Symbol.FINAL_STATUS: (FINAL_STATUS, "TASK_FINAL_STATUS"),
}
#: The plan's symbols a step writes: the task output parameter each one becomes.
_OUTPUTS: dict[Symbol, tuple[str, str]] = {
    Symbol.MLFLOW_RUN_ID_OUTPUT: (MLFLOW_RUN_ID, "STRING"),
}


@dataclass(frozen=True)
class KfpPipeline:
    spec: dict[str, Any]
    #: ``run_config.kubernetes`` as a Kubernetes platform spec (KFP applies it), None if unset.
    platform_spec: dict[str, Any] | None


def render_kfp(plan: PipelinePlan, gpu_resource_name: str | None = None) -> KfpPipeline:
    """The pipeline spec of ``plan`` (checked for dangling references) and its platform spec.
    ``gpu_resource_name``: the target asks for GPUs by this Kubernetes resource name, the
    accelerator type becoming a node selector (KFP); None: by accelerator type (Vertex AI)."""
    if plan.code_upload is not None:
        raise ValueError("the plan's code archive is not uploaded yet: run compiler.upload.upload_code first")
    parameter_types = {parameter.name: PARAMETER_TYPES[parameter.type] for parameter in plan.parameters}
    builder = SpecBuilder(
        name=plan.name, description=plan.description, image=plan.image, parameters=plan.parameters,
        storage_root=plan.storage_root, mlflow=plan.mlflow, has_exit_handler=bool(plan.exit_steps),
        failure_policy=plan.failure_policy,
    )
    spec = builder.build(
        [_task(step, parameter_types, gpu_resource_name, after_body=False) for step in plan.steps],
        None,
        [_task(step, parameter_types, gpu_resource_name, after_body=True) for step in plan.exit_steps],
    )
    check_references(spec)
    # Kubernetes pods (KFP): every configured node label and the accelerator's; Vertex AI has none.
    node_selectors = {executor_label(step.name): step.resources.pod_node_selector(gpu_resource_name)
                      for step in (*plan.steps, *plan.exit_steps)
                      if step.resources is not None and gpu_resource_name}
    return KfpPipeline(spec=spec, platform_spec=kubernetes_platform_spec(spec, plan.kubernetes, node_selectors))


def _task(step: PlannedStep, parameter_types: Mapping[str, str], gpu_resource_name: str | None, *,
          after_body: bool) -> Step:
    """One task; ``after_body``: an exit step, run by the exit handler whatever the body's outcome."""
    inputs: dict[str, str] = {}
    outputs: dict[str, str] = {}
    for reference in step.references():
        if isinstance(reference, ParameterRef):
            inputs[reference.name] = _parameter_type(parameter_types, reference)
        elif reference in _OUTPUTS:
            name, kind = _OUTPUTS[reference]
            outputs[name] = kind
        else:
            name, kind = _INPUTS[reference]
            inputs[name] = kind
    return Step(
        task=step.name,
        display_name=step.name,
        command=[PROGRAM, step.command],
        args=[fill(arg, _placeholder) for arg in step.args()],
        inputs=inputs,
        outputs=outputs,
        depends_on=[EXIT_HANDLER] if after_body else list(step.after),
        resources=step.resources.to_spec(gpu_resource_name) if step.resources is not None else {},
        retry=retry_policy(step.retry),
        env=dict(step.env),
        final_status=after_body,
    )


def _parameter_type(parameter_types: Mapping[str, str], reference: ParameterRef) -> str:
    if reference.name not in parameter_types:
        raise ValueError(f"a step reads pipeline parameter '{reference.name}', which the plan does not declare")
    return parameter_types[reference.name]


def _placeholder(reference: Reference) -> str:
    if isinstance(reference, ParameterRef):
        return placeholder(reference.name)
    if reference in _OUTPUTS:
        return output_file(_OUTPUTS[reference][0])
    return placeholder(_INPUTS[reference][0])
