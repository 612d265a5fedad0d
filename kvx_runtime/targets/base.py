"""A place that runs compiled pipelines: submit, watch, list, cancel, schedule, upload.

The interface knows pipeline runs, tasks, schedules and uploaded pipelines, nothing
Vertex-only: Vertex AI Pipelines (:mod:`.vertex`) and Kubeflow Pipelines (:mod:`.kubeflow`)
implement it, and :mod:`.registry` declares them. Commands (``run-once``, ``schedule``,
``status``...) talk to a :class:`PipelineTarget` only.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from kvx_runtime.errors import UsageError

if TYPE_CHECKING:
    from kvx_runtime.config import PluginConfig

__all__ = [
    "FINAL_STATES",
    "PAUSED_STATES",
    "PipelineTarget",
    "RunInfo",
    "RunRequest",
    "ScheduleInfo",
    "ScheduleRequest",
    "TaskInfo",
    "UploadRequest",
]

#: Run and task states, as the targets report them after normalization.
FINAL_STATES = frozenset({"SUCCEEDED", "FAILED", "CANCELLED", "SKIPPED"})
#: States a run stays in until somebody acts (Vertex AI's and Kubeflow's PAUSED): watching it stops.
PAUSED_STATES = frozenset({"PAUSED"})


@dataclass(frozen=True)
class RunRequest:
    """One run of a compiled pipeline spec."""

    spec: Mapping[str, Any]
    run_id: str  # the id the target gives the run (Vertex: the PipelineJob id)
    display_name: str
    parameters: Mapping[str, Any] = field(default_factory=dict)
    labels: Mapping[str, str] = field(default_factory=dict)
    failure_policy: str = "fail_slow"  # fail_slow | fail_fast
    #: Where the target keeps run artifacts (Vertex: runtimeConfig.gcsOutputDirectory).
    output_root: str | None = None
    service_account: str | None = None
    network: str | None = None
    encryption_key: str | None = None
    #: A spec already uploaded to the target (Vertex: templateUri) instead of ``spec``.
    template_uri: str | None = None
    #: Kubernetes pod settings beside the spec (KFP's platform spec; Vertex AI has none).
    platform_spec: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class TaskInfo:
    name: str
    state: str
    error: str | None = None
    start: datetime | None = None
    end: datetime | None = None
    #: Target-specific ids of what ran the task (Vertex: the CustomJob resource name).
    executor: str | None = None


@dataclass(frozen=True)
class RunInfo:
    name: str  # the target's full resource name
    run_id: str
    display_name: str
    state: str
    create_time: datetime | None = None
    start_time: datetime | None = None
    end_time: datetime | None = None
    error: str | None = None
    tasks: tuple[TaskInfo, ...] = ()
    labels: Mapping[str, str] = field(default_factory=dict)
    #: The spec and parameter values the run ran with, when the target returns them.
    spec: Mapping[str, Any] | None = None
    parameters: Mapping[str, Any] = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        return self.state in FINAL_STATES

    @property
    def duration(self) -> float | None:
        if self.start_time is None:
            return None
        end = self.end_time or datetime.now(self.start_time.tzinfo)
        return (end - self.start_time).total_seconds()


@dataclass(frozen=True)
class ScheduleRequest:
    display_name: str
    cron: str
    timezone: str | None
    run: RunRequest
    start_time: str | None = None
    end_time: str | None = None
    max_run_count: int | None = None
    max_concurrent_runs: int = 1
    allow_queueing: bool = False


@dataclass(frozen=True)
class ScheduleInfo:
    name: str
    display_name: str
    state: str
    cron: str
    next_run_time: datetime | None = None


@dataclass(frozen=True)
class UploadRequest:
    """A compiled pipeline to publish on the target, for runs to start from (upload-pipeline)."""

    spec: Mapping[str, Any]
    #: Kubernetes pod settings beside the spec (KFP's platform spec).
    platform_spec: Mapping[str, Any] | None = None
    #: The user's own tags; the target adds what identifies the code (version, commit).
    tags: tuple[str, ...] = ()
    #: The project's version (pyproject.toml) and commit (KEDRO_CONFIG_COMMIT_ID), when known.
    project_version: str | None = None
    commit: str | None = None
    #: What the pipeline is (run_config.description), for targets that show it.
    description: str = ""


class PipelineTarget(ABC):
    """A place that runs compiled pipelines."""

    #: What users call the target in messages ("Vertex AI").
    title: str = "pipeline service"

    @classmethod
    @abstractmethod
    def from_config(cls, config: PluginConfig) -> PipelineTarget:
        """The client that a project's plugin config (vertexai.yml, kubeflow.yml) describes."""

    @abstractmethod
    def submit(self, run: RunRequest) -> RunInfo:
        """Start a run; returns it as the target sees it right after creation."""

    @abstractmethod
    def get(self, name: str) -> RunInfo:
        """A run by resource name or run id, with its tasks."""

    @abstractmethod
    def list_runs(self, pipeline: str | None = None) -> Iterator[RunInfo]:
        """Runs, newest first; of one pipeline (its name here: :meth:`pipeline_name`) unless None."""

    def pipeline_name(self, package_name: str, pipeline: str) -> str:
        """What this target calls a project's pipeline (the name its runs are found by)."""
        from kvx_runtime.compiler.names import project_pipeline_name

        return project_pipeline_name(package_name, pipeline)

    @abstractmethod
    def cancel(self, name: str) -> None:
        """Ask the target to stop a run (it may take a while to stop)."""

    @abstractmethod
    def find_schedule(self, display_name: str) -> ScheduleInfo | None:
        """The schedule with this display name, if any."""

    @abstractmethod
    def upsert_schedule(self, request: ScheduleRequest) -> tuple[ScheduleInfo, bool]:
        """Create the schedule, or update the one with the same display name in place;
        returns it and whether it was created."""

    @abstractmethod
    def set_schedule_state(self, name: str, action: str) -> ScheduleInfo | None:
        """``pause``, ``resume`` or ``delete`` (then None) a schedule."""

    def check_upload(self) -> None:  # noqa: B027  (a hook: most targets have nothing to check)
        """Refuse, before anything is compiled, an upload the target's config does not allow
        (default: nothing to check)."""

    @abstractmethod
    def upload(self, request: UploadRequest) -> str:
        """Publish a compiled pipeline; returns one line for the user saying what went where."""

    def rerun_unfinished(self, run: RunInfo) -> RunInfo | None:
        """Run again, within ``run`` itself, its tasks that failed or did not run, where the
        target can (Airflow: clearing them); None where it cannot (``resume`` then submits a
        new run that continues this one)."""
        return None

    def template_uri(self, spec: Mapping[str, Any], tag: str | None) -> str | None:
        """Where the spec uploaded with ``tag`` is, for a run to start from it instead of
        ``spec`` (run-once and schedule ``--template``); None without a tag."""
        if tag is None:
            return None
        raise UsageError(f"--template is not a {self.title} option", hint="run-once sends the compiled spec itself")

    def run_once_name(self) -> str | None:
        """What a run-once run's id is made from when the target's config names it (default:
        the pipeline's name)."""
        return None

    @abstractmethod
    def console_url(self, run: RunInfo | None = None) -> str:
        """Where a user watches the run (or all runs) in a browser."""

    def job_name(self, run: RunInfo) -> str:
        """The job name the run's steps use (for their intermediates and the replay command)."""
        return run.run_id

    def job_directory(self, run: RunInfo) -> str:
        """The name of the run's job directory (its steps' intermediates), as its steps named it
        (default: the job name, where that is unique per run already)."""
        return self.job_name(run)

    def step_run_id(self, run: RunInfo) -> str | None:
        """The run id the run's steps were given (``{{$.pipeline_job_uuid}}``), when the API
        says it; None when only the steps know it (Vertex AI: then it is read from the job
        directory's owner record)."""
        return None

    def logs_url(self, run: RunInfo, task: TaskInfo) -> str | None:
        """Where a task's logs are, if the target has such a place."""
        return None

    def task_errors(self, run: RunInfo, task: TaskInfo, limit: int = 5) -> list[str]:
        """The last error lines a task logged, if the target can read them."""
        return []

    def replay_command(self, run: RunInfo, task: TaskInfo) -> str | None:
        """The task's exec-node command as the target ran it, when the target can say (Airflow:
        the task's rendered command); None: it is rebuilt from the compiled spec."""
        return None
