"""What a step can tell about the orchestrator that started it.

One spec runs on Vertex AI Pipelines and on Kubeflow Pipelines, and the two fill the same
placeholders differently: ``{{$.pipeline_job_name}}`` is the job's unique id on Vertex AI
but the run's *display name* on KFP, which runs may share (every run of an uploaded pipeline
started from the UI can carry the same one). Intermediates and the MLflow run are found by
job name, so on KFP the name is made unique with the run's uuid: two runs must never share
their blobs. KFP's pods are recognized by ``KFP_POD_NAME``, which KFP v2 sets in every step's
main container (Vertex AI does not).
"""

from __future__ import annotations

import os

__all__ = ["KFP_POD_VARIABLE", "on_kubeflow", "unique_job_name"]

KFP_POD_VARIABLE = "KFP_POD_NAME"


def on_kubeflow() -> bool:
    """Does this step run in a Kubeflow Pipelines pod?"""
    return bool(os.environ.get(KFP_POD_VARIABLE))


def unique_job_name(job_name: str, run_id: str | None, *, kubeflow: bool | None = None) -> str:
    """``job_name``, unique per run: on KFP (default: in a KFP pod) with the run's uuid appended
    (unless it holds it)."""
    if (on_kubeflow() if kubeflow is None else kubeflow) and run_id and run_id not in job_name:
        return f"{job_name}-{run_id}"
    return job_name
