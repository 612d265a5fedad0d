"""The slim compiler: a Kedro pipeline -> a Vertex AI / Kubeflow Pipelines v2 pipeline spec.

No kfp SDK at run time: the spec is built as plain dicts (see :mod:`.spec`) and checked by
:func:`.checks.check_references` and :func:`.checks.check_node_dependencies`. Tests
additionally parse it with kfp-pipeline-spec.
"""

from kvx_runtime.compiler.checks import check_node_dependencies, check_references
from kvx_runtime.compiler.compiler import (
    CompiledPipeline,
    CompileRequest,
    StepGraph,
    compile_pipeline,
    plan_steps,
    read_spec,
    write_spec,
)

__all__ = [
    "CompileRequest",
    "CompiledPipeline",
    "StepGraph",
    "check_node_dependencies",
    "check_references",
    "compile_pipeline",
    "plan_steps",
    "read_spec",
    "write_spec",
]
