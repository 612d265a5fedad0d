"""One MLflow run per pipeline, shared by every step (see :mod:`.pipeline_run`)."""

from kvx_runtime.mlflow.pipeline_run import (
    FINAL_STATES,
    TAG_FAILED_NODE,
    TAG_FINAL_STATE,
    TAG_JOB_NAME,
    TAG_LAST_NODE,
    TAG_RUN_ID,
    AttachedRun,
    MlflowConnection,
    attach_step,
    connect,
    end_pipeline_run,
    find_run,
    mlflow_available,
    mlflow_enabled,
    parse_final_status,
    start_pipeline_run,
)

__all__ = [
    "FINAL_STATES",
    "TAG_FAILED_NODE",
    "TAG_FINAL_STATE",
    "TAG_JOB_NAME",
    "TAG_LAST_NODE",
    "TAG_RUN_ID",
    "AttachedRun",
    "MlflowConnection",
    "attach_step",
    "connect",
    "end_pipeline_run",
    "find_run",
    "mlflow_available",
    "mlflow_enabled",
    "parse_final_status",
    "start_pipeline_run",
]
