"""Places that run compiled pipelines (:class:`~.base.PipelineTarget`): Vertex AI first."""

from kvx_runtime.targets.base import (
    FINAL_STATES,
    PipelineTarget,
    RunInfo,
    RunRequest,
    ScheduleInfo,
    ScheduleRequest,
    TaskInfo,
)
from kvx_runtime.targets.vertex import ApiError, VertexTarget

__all__ = [
    "FINAL_STATES",
    "ApiError",
    "PipelineTarget",
    "RunInfo",
    "RunRequest",
    "ScheduleInfo",
    "ScheduleRequest",
    "TaskInfo",
    "VertexTarget",
]
