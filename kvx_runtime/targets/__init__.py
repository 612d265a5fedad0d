"""Places that run compiled pipelines (:class:`~.base.PipelineTarget`): Vertex AI and Kubeflow
Pipelines, declared in :mod:`.registry`.

The clients (and their HTTP layer) are imported on first use: the command line imports this
package at start-up, through the registry, and ``exec-node`` must not pay for them.
"""

from typing import TYPE_CHECKING, Any

from kvx_runtime.targets.base import (
    FINAL_STATES,
    PipelineTarget,
    RunInfo,
    RunRequest,
    ScheduleInfo,
    ScheduleRequest,
    TaskInfo,
    UploadRequest,
)
from kvx_runtime.targets.registry import TARGETS, TargetInfo, default_target, get_target

if TYPE_CHECKING:
    from kvx_runtime.targets.http import ApiError
    from kvx_runtime.targets.kubeflow import KubeflowTarget
    from kvx_runtime.targets.vertex import VertexTarget

__all__ = [
    "FINAL_STATES",
    "TARGETS",
    "ApiError",
    "KubeflowTarget",
    "PipelineTarget",
    "RunInfo",
    "RunRequest",
    "ScheduleInfo",
    "ScheduleRequest",
    "TargetInfo",
    "TaskInfo",
    "UploadRequest",
    "VertexTarget",
    "default_target",
    "get_target",
]

_LAZY = {
    "ApiError": "kvx_runtime.targets.http",
    "KubeflowTarget": "kvx_runtime.targets.kubeflow",
    "VertexTarget": "kvx_runtime.targets.vertex",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
