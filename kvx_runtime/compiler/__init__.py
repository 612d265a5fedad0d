"""The slim compiler: a Kedro pipeline -> a Vertex AI / Kubeflow Pipelines v2 pipeline spec.

Phases: :mod:`.loading` reads the project, :mod:`.planner` makes a target-neutral
:class:`~.plan.PipelinePlan`, :mod:`.upload` stores the code archive when asked, and
:mod:`.kfp_render` renders the plan as a KFP spec (plain dicts, no kfp SDK at run time), checked
by :func:`.checks.check_references` and :func:`.checks.check_node_dependencies`, which read it
back with :mod:`.kfp_reader`. Tests additionally parse it with kfp-pipeline-spec.
:mod:`.airflow_render` renders the same plan as an Airflow 3 DAG file.
"""

from kvx_runtime.compiler.checks import check_node_dependencies, check_references
from kvx_runtime.compiler.compiler import (
    CompiledDag,
    CompiledPipeline,
    compile_dag,
    compile_pipeline,
    read_spec,
    write_spec,
)
from kvx_runtime.compiler.plan import PipelinePlan
from kvx_runtime.compiler.planner import CompileRequest, StepGraph, plan_pipeline, plan_steps

__all__ = [
    "CompileRequest",
    "CompiledDag",
    "CompiledPipeline",
    "PipelinePlan",
    "StepGraph",
    "check_node_dependencies",
    "check_references",
    "compile_dag",
    "compile_pipeline",
    "plan_pipeline",
    "plan_steps",
    "read_spec",
    "write_spec",
]
