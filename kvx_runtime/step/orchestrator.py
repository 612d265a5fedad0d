"""The orchestrator a step runs under, as a small strategy.

One spec runs on Vertex AI Pipelines and on Kubeflow Pipelines, and the two fill the same
placeholders differently: ``{{$.pipeline_job_name}}`` is the job's unique id on Vertex AI
but the run's *display name* on KFP, which runs may share (every run of an uploaded pipeline
started from the UI can carry the same one). Intermediates and the MLflow run are found by
job name, so on KFP the name is made unique with the run's uuid: two runs must never share
their blobs. KFP's pods are recognized by ``KFP_POD_NAME``, which KFP v2 sets in every step's
main container (Vertex AI does not); ``KVX_ORCHESTRATOR`` names the orchestrator explicitly
(a target whose pods cannot be recognized sets it in every step's environment: the Airflow
DAGs do).
"""

from __future__ import annotations

import os
import re
from typing import ClassVar

from kvx_runtime import settings
from kvx_runtime.errors import ConfigError

__all__ = ["KFP_POD_VARIABLE", "Airflow", "KubeflowPipelines", "Local", "Orchestrator", "VertexAI", "by_name",
           "current"]

KFP_POD_VARIABLE = "KFP_POD_NAME"


class Orchestrator:
    """What differs between orchestrators, seen from inside a step."""

    name: ClassVar[str]

    def job_directory_name(self, job_name: str, run_id: str | None) -> str:
        """The name of the run's job directory (and MLflow run): unique per run. The job
        name as the orchestrator passes it, where that is unique already."""
        return job_name

    def run_tags(self, run_id: str) -> dict[str, str]:
        """MLflow tags that link the pipeline's run to the orchestrator's own page of it."""
        return {}


class VertexAI(Orchestrator):
    """Vertex AI Pipelines: ``pipeline_job_name`` is the job's id, unique per run."""

    name = "vertex"


class KubeflowPipelines(Orchestrator):
    """Kubeflow Pipelines: ``pipeline_job_name`` is the run's display name, shared by runs."""

    name = "kubeflow"

    def job_directory_name(self, job_name: str, run_id: str | None) -> str:
        if run_id and run_id not in job_name:
            return f"{job_name}-{run_id}"
        return job_name

    def run_tags(self, run_id: str) -> dict[str, str]:
        return {"kubeflow_run_id": run_id}


class Airflow(Orchestrator):
    """Airflow: the DAG passes its ``dag_id`` as the job name, shared by every run of the DAG,
    and Airflow's ``run_id`` (``manual__2026-01-01T00:00:00+00:00``), unique per DAG."""

    name = "airflow"

    def job_directory_name(self, job_name: str, run_id: str | None) -> str:
        if not run_id:
            return job_name
        # ':' and '+' are legal in Airflow run ids but awkward in object names and MLflow run names.
        suffix = re.sub(r"[^A-Za-z0-9_.-]+", "-", run_id).strip("-")
        return job_name if suffix in job_name else f"{job_name}-{suffix}"

    def run_tags(self, run_id: str) -> dict[str, str]:
        return {"airflow_run_id": run_id}


class Local(Orchestrator):
    """A step started by hand, by ``run-local`` or by a test: names are taken as given."""

    name = "local"


_KNOWN: dict[str, type[Orchestrator]] = {kind.name: kind for kind in (VertexAI, KubeflowPipelines, Airflow, Local)}


def by_name(name: str) -> Orchestrator:
    kind = _KNOWN.get(name.strip().lower())
    if kind is None:
        raise ConfigError(f"unknown orchestrator {name!r}", hint=f"use one of {', '.join(_KNOWN)}")
    return kind()


def current() -> Orchestrator:
    """``KVX_ORCHESTRATOR`` if set, else KFP when in a KFP pod, else names as given."""
    explicit = settings.ORCHESTRATOR.get()
    if explicit:
        try:
            return by_name(explicit)
        except ConfigError as exc:
            raise ConfigError(f"{settings.ORCHESTRATOR.name}={explicit!r}: {exc.message}", hint=exc.hint) from None
    if os.environ.get(KFP_POD_VARIABLE):
        return KubeflowPipelines()
    return Local()
