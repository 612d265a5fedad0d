"""Places that run compiled pipelines (:class:`~.base.PipelineTarget`): Vertex AI and Kubeflow
Pipelines."""

from kvx_runtime.targets.base import (
    FINAL_STATES,
    PipelineTarget,
    RunInfo,
    RunRequest,
    ScheduleInfo,
    ScheduleRequest,
    TaskInfo,
)
from kvx_runtime.targets.http import ApiError
from kvx_runtime.targets.kubeflow import KubeflowTarget
from kvx_runtime.targets.vertex import VertexTarget

__all__ = [
    "FINAL_STATES",
    "ApiError",
    "KubeflowTarget",
    "PipelineTarget",
    "RunInfo",
    "RunRequest",
    "ScheduleInfo",
    "ScheduleRequest",
    "TaskInfo",
    "VertexTarget",
]
