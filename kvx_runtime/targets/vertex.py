"""Vertex AI Pipelines through its REST API (v1), without the aiplatform or kfp SDKs.

Requests go through google-auth's ``AuthorizedSession`` with Application Default Credentials
(cloud-platform scope) to the regional endpoint ``https://{region}-aiplatform.googleapis.com``
(``KVX_VERTEX_ENDPOINT`` replaces it: tests, private endpoints). 429, 5xx and connection errors
are retried with backoff (tenacity), other 4xx never; list calls follow ``nextPageToken``. An
API error is one line with Google's status and message: exit 2 for 400/403/404 (and other
4xx), exit 3 after retries. No token or credential ever reaches a log or an error.

Compiled pipelines are uploaded as templates to an Artifact Registry repository of format
Kubeflow Pipelines (``run_config.template_repository``); runs start from one with ``--template``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from kvx_runtime import settings
from kvx_runtime.compiler.names import label_value
from kvx_runtime.errors import ConfigError, InfrastructureError, UsageError
from kvx_runtime.log import get_logger
from kvx_runtime.targets.base import (
    PipelineTarget,
    RunInfo,
    RunRequest,
    ScheduleInfo,
    ScheduleRequest,
    TaskInfo,
    UploadRequest,
)
from kvx_runtime.targets.http import ApiError, create_once, parse_time, request_json

if TYPE_CHECKING:
    from kvx_runtime.config import PluginConfig

__all__ = ["ApiError", "VertexTarget"]

log = get_logger(__name__)

#: The label that marks a job with its submission (a retried create finds its own job by it).
SUBMISSION_LABEL = "kvx-submission"

SCOPE = "https://www.googleapis.com/auth/cloud-platform"
_STATE_PREFIX = "PIPELINE_STATE_"
FAILURE_POLICIES = {"fail_slow": "PIPELINE_FAILURE_POLICY_FAIL_SLOW", "fail_fast": "PIPELINE_FAILURE_POLICY_FAIL_FAST"}
#: What a template repository looks like (run_config.template_repository).
_REPOSITORY_FORM = "https://{region}-kfp.pkg.dev/{project}/{repository}"
#: The fields a schedule update changes (never its name or run history).
_SCHEDULE_FIELDS = ("cron", "startTime", "endTime", "maxRunCount", "maxConcurrentRunCount", "allowQueueing",
                    "createPipelineJobRequest")


class VertexTarget(PipelineTarget):
    title = "Vertex AI"

    def __init__(self, project: str, region: str, *, session: Any = None, endpoint: str | None = None,
                 attempts: int | None = None, template_repository: str | None = None) -> None:
        if not project or not region:
            raise ConfigError("Vertex AI needs project_id and region",
                              hint="set them in vertexai.yml (kedro vertexai init)")
        self.project = project
        self.region = region
        self.endpoint = (endpoint or settings.VERTEX_ENDPOINT.get()
                         or f"https://{region}-aiplatform.googleapis.com").rstrip("/")
        self.parent = f"projects/{project}/locations/{region}"
        self._session = session
        self._attempts = attempts or settings.VERTEX_ATTEMPTS.get()
        self.template_repository = template_repository

    @classmethod
    def from_config(cls, config: PluginConfig) -> VertexTarget:
        return cls(str(config.project_id or ""), str(config.region or ""),
                   template_repository=config.run_config.template_repository)

    # --- transport --------------------------------------------------------------------------

    @property
    def session(self) -> Any:
        if self._session is None:
            import google.auth
            from google.auth.exceptions import DefaultCredentialsError
            from google.auth.transport.requests import AuthorizedSession

            try:
                credentials, _ = google.auth.default(scopes=[SCOPE])
            except DefaultCredentialsError as exc:
                raise ConfigError(
                    "no Google credentials: " + str(exc).splitlines()[0][:200],
                    hint="run `gcloud auth application-default login`, or set GOOGLE_APPLICATION_CREDENTIALS",
                ) from None
            self._session = AuthorizedSession(credentials)
        return self._session

    def _request(self, method: str, path: str, *, params: Mapping[str, Any] | None = None,
                 body: Any = None, base: str | None = None, data: Any = None, files: Any = None,
                 service: str = "Vertex AI", attempts: int | None = None) -> Any:
        url = f"{base or self.endpoint + '/v1'}/{path}".rstrip("/")
        return request_json(self.session, method, url, service=service, what=f"{method} {path.split('?')[0]}",
                            params=params, body=body, data=data, files=files, attempts=attempts or self._attempts,
                            wait=settings.VERTEX_RETRY_WAIT.get())

    def _pages(self, path: str, key: str, params: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
        token: str | None = None
        while True:
            page = self._request("GET", path, params={**params, **({"pageToken": token} if token else {})})
            yield from page.get(key, [])
            token = page.get("nextPageToken")
            if not token:
                return

    # --- runs -----------------------------------------------------------------------------

    def _job_name(self, name: str) -> str:
        return name if name.startswith("projects/") else f"{self.parent}/pipelineJobs/{name}"

    def job_body(self, run: RunRequest) -> dict[str, Any]:
        """The PipelineJob resource for ``run`` (also the Schedule's createPipelineJobRequest)."""
        runtime: dict[str, Any] = {"parameterValues": dict(run.parameters),
                                   "failurePolicy": FAILURE_POLICIES[run.failure_policy]}
        if run.output_root:
            runtime["gcsOutputDirectory"] = run.output_root
        body: dict[str, Any] = {"displayName": run.display_name, "runtimeConfig": runtime,
                                "labels": dict(run.labels)}
        if run.template_uri:
            body["templateUri"] = run.template_uri
        else:
            body["pipelineSpec"] = dict(run.spec)
        if run.service_account:
            body["serviceAccount"] = run.service_account
        if run.network:
            body["network"] = run.network
        if run.encryption_key:
            body["encryptionSpec"] = {"kmsKeyName": run.encryption_key}
        if run.platform_spec:
            log.warning("run_config.kubernetes is for Kubeflow Pipelines; Vertex AI does not apply it (steps get "
                        "credentials from their service account)", setting="run_config.kubernetes")
        return body

    def submit(self, run: RunRequest) -> RunInfo:
        """Create the job. A retry after a lost answer gets 409 for the job it created: the job
        carries a token of this submission, so ours is told from another with the same id."""
        import uuid

        token = uuid.uuid4().hex
        body = self.job_body(run)
        body["labels"][SUBMISSION_LABEL] = token
        try:
            payload = self._request("POST", f"{self.parent}/pipelineJobs", params={"pipelineJobId": run.run_id},
                                    body=body)
        except ApiError as exc:
            conflict = exc.status == 409
            if not conflict and exc.exit_code != InfrastructureError.exit_code:
                raise
            try:  # a 409 for our own job, or no answer at all: the job may exist all the same
                payload = self._request("GET", self._job_name(run.run_id))
            except ApiError:
                if conflict:
                    raise
                raise exc from None  # not there (or not reachable either): the create's own error
            if (payload.get("labels") or {}).get(SUBMISSION_LABEL) != token:
                if not conflict:
                    raise exc from None
                raise ApiError(f"a pipeline job {run.run_id} already exists (another submission's)", status=409,
                               hint="submit again: the job id carries the time to the second") from None
            log.info("the answer to the job's creation was lost; the job exists", job=run.run_id)
        return self._run(payload)

    def get(self, name: str) -> RunInfo:
        return self._run(self._request("GET", self._job_name(name)))

    def list_runs(self, pipeline: str | None = None) -> Iterator[RunInfo]:
        params: dict[str, Any] = {"orderBy": "create_time desc", "pageSize": 100}
        if pipeline:
            params["filter"] = f'labels.kvx-pipeline="{label_value(pipeline)}"'
        for job in self._pages(f"{self.parent}/pipelineJobs", "pipelineJobs", params):
            yield self._run(job)

    def cancel(self, name: str) -> None:
        self._request("POST", f"{self._job_name(name)}:cancel", body={})

    def _run(self, job: Mapping[str, Any]) -> RunInfo:
        name = str(job.get("name", ""))
        tasks = []
        for detail in (job.get("jobDetail") or {}).get("taskDetails", []) or []:
            executor = (detail.get("executorDetail") or {}).get("containerDetail") or {}
            error = detail.get("error") or {}
            tasks.append(TaskInfo(
                name=str(detail.get("taskName", "")),
                state=str(detail.get("state", "STATE_UNSPECIFIED")),
                error=str(error.get("message")) if error.get("message") else None,
                start=parse_time(detail.get("startTime")),
                end=parse_time(detail.get("endTime")),
                executor=executor.get("mainJob"),
            ))
        error = job.get("error") or {}
        return RunInfo(
            name=name,
            run_id=name.rsplit("/", 1)[-1],
            display_name=str(job.get("displayName", "")),
            state=str(job.get("state", "PIPELINE_STATE_UNSPECIFIED")).removeprefix(_STATE_PREFIX),
            create_time=parse_time(job.get("createTime")),
            start_time=parse_time(job.get("startTime")),
            end_time=parse_time(job.get("endTime")),
            error=str(error.get("message")) if error.get("message") else None,
            tasks=tuple(tasks),
            labels=dict(job.get("labels") or {}),
            spec=job.get("pipelineSpec"),
            parameters=dict((job.get("runtimeConfig") or {}).get("parameterValues") or {}),
        )

    # --- schedules --------------------------------------------------------------------------

    def _schedule(self, payload: Mapping[str, Any]) -> ScheduleInfo:
        return ScheduleInfo(name=str(payload.get("name", "")), display_name=str(payload.get("displayName", "")),
                            state=str(payload.get("state", "")), cron=str(payload.get("cron", "")),
                            next_run_time=parse_time(payload.get("nextRunTime")))

    def _schedules_named(self, display_name: str) -> list[dict[str, Any]]:
        params = {"filter": f'display_name="{display_name}"', "pageSize": 100}
        return [schedule for schedule in self._pages(f"{self.parent}/schedules", "schedules", params)
                if schedule.get("displayName") == display_name]  # the filter is a hint, this is the rule

    def _live_schedule(self, display_name: str) -> dict[str, Any] | None:
        """The schedule of that name that is not COMPLETED (past its end time or run count: it
        starts no run and cannot be updated), else the newest completed one, else None."""
        found = self._schedules_named(display_name)
        live = [schedule for schedule in found if schedule.get("state") != "COMPLETED"]
        if live or found:
            return (live or sorted(found, key=lambda schedule: str(schedule.get("createTime", ""))))[-1]
        return None

    def find_schedule(self, display_name: str) -> ScheduleInfo | None:
        found = self._live_schedule(display_name)
        return None if found is None else self._schedule(found)

    def schedule_body(self, request: ScheduleRequest) -> dict[str, Any]:
        cron = f"TZ={request.timezone} {request.cron}" if request.timezone else request.cron
        body: dict[str, Any] = {
            "displayName": request.display_name,
            "cron": cron,
            "maxConcurrentRunCount": str(request.max_concurrent_runs),
            "allowQueueing": request.allow_queueing,
            "createPipelineJobRequest": {"parent": self.parent, "pipelineJob": self.job_body(request.run)},
        }
        if request.start_time:
            body["startTime"] = request.start_time
        if request.end_time:
            body["endTime"] = request.end_time
        if request.max_run_count is not None:
            body["maxRunCount"] = str(request.max_run_count)
        return body

    def upsert_schedule(self, request: ScheduleRequest) -> tuple[ScheduleInfo, bool]:
        body = self.schedule_body(request)
        existing = self._live_schedule(request.display_name)
        if existing is None or existing.get("state") == "COMPLETED":
            return self._schedule(self._create_schedule(body)), True
        # Vertex AI cannot unset a field a schedule has ("the non-empty fields cannot be unset"):
        # an end or a run count the config no longer sets is refused here, saying what to do.
        dropped = [field for field, option in (("endTime", "end_time"), ("maxRunCount", "max_run_count"))
                   if existing.get(field) and field not in body]
        if dropped:
            raise UsageError(
                f"schedule {request.display_name!r} has {' and '.join(dropped)} "
                f"({', '.join(str(existing[field]) for field in dropped)}), which this configuration leaves "
                "out: Vertex AI cannot unset them on an existing schedule",
                hint="set them again, or remove the schedule (schedule --delete) and schedule again")
        fields = [name for name in _SCHEDULE_FIELDS if name in body]
        updated = self._request("PATCH", str(existing["name"]), params={"updateMask": ",".join(sorted(fields))},
                                body=body)
        return self._schedule(updated), False

    def _create_schedule(self, body: Mapping[str, Any]) -> dict[str, Any]:
        """Create the schedule, never two: Vertex AI takes no request id for a schedule, so
        after a lost answer a schedule of this name made since is looked for first."""
        before = {str(schedule.get("name")) for schedule in self._schedules_named(str(body["displayName"]))}

        def made_by_an_earlier_try() -> dict[str, Any] | None:
            made = [schedule for schedule in self._schedules_named(str(body["displayName"]))
                    if str(schedule.get("name")) not in before]
            return made[-1] if made else None

        return dict(create_once("schedule", lambda: self._request("POST", f"{self.parent}/schedules", body=body,
                                                                  attempts=1),
                                made_by_an_earlier_try, attempts=self._attempts))

    def set_schedule_state(self, name: str, action: str) -> ScheduleInfo | None:
        """Pause, resume or delete; an action an earlier try (whose answer was lost) took
        already is done, not an error."""
        if action == "delete":
            try:
                self._request("DELETE", name)
            except ApiError as exc:
                if exc.status != 404:
                    raise
            return None
        if action not in {"pause", "resume"}:
            raise UsageError(f"unknown schedule action {action!r}")
        try:
            self._request("POST", f"{name}:{action}", body={})
        except ApiError as exc:
            wanted = "PAUSED" if action == "pause" else "ACTIVE"
            if exc.status != 400 or self._schedule(self._request("GET", name)).state != wanted:
                raise
        return self._schedule(self._request("GET", name))

    # --- where to look ----------------------------------------------------------------------

    def console_url(self, run: RunInfo | None = None) -> str:
        if run is None:
            return f"https://console.cloud.google.com/vertex-ai/pipelines/runs?project={quote(self.project)}"
        return (f"https://console.cloud.google.com/vertex-ai/locations/{quote(self.region)}/pipelines/runs/"
                f"{quote(run.run_id)}?project={quote(self.project)}")

    def task_errors(self, run: RunInfo, task: TaskInfo, limit: int = 5) -> list[str]:
        """The task's last ERROR entries, through the Cloud Logging API (``entries:list``)."""
        job_id = (task.executor or "").rsplit("/", 1)[-1]
        if not job_id:
            return []
        base = settings.LOGGING_ENDPOINT.get().rstrip("/") + "/v2"
        body = {"resourceNames": [f"projects/{self.project}"], "orderBy": "timestamp desc", "pageSize": limit,
                "filter": f'resource.type="ml_job" AND resource.labels.job_id="{job_id}" AND severity>=ERROR'}
        try:
            payload = self._request("POST", "entries:list", body=body, base=base, service="Cloud Logging")
        except ApiError as exc:
            return [f"(cannot read the logs: {exc.message}; reading them needs roles/logging.viewer)"]
        lines = []
        for entry in reversed(payload.get("entries", [])):
            message = entry.get("textPayload") or (entry.get("jsonPayload") or {}).get("message") or ""
            lines.append(f"{entry.get('timestamp', '')} {' '.join(str(message).split())[:500]}")
        return lines

    # --- pipeline templates (Artifact Registry, Kubeflow Pipelines format) --------------------

    def _upload_repository(self) -> str:
        if not self.template_repository:
            raise ConfigError("no run_config.template_repository",
                              hint=f"{_REPOSITORY_FORM} (an Artifact Registry repository of format Kubeflow "
                              "Pipelines)")
        return self.template_repository

    def check_upload(self) -> None:
        self._upload_repository()

    def upload(self, request: UploadRequest) -> str:
        """The spec as a template of run_config.template_repository, tagged with the user's tags,
        the project version, the commit and ``latest``."""
        import re
        import tempfile
        from pathlib import Path

        from kvx_runtime.compiler import write_spec

        repository = self._upload_repository()
        wanted = [*request.tags, *([f"v{request.project_version}"] if request.project_version else []),
                  *([request.commit] if request.commit else []), "latest"]
        tags = list(dict.fromkeys(re.sub(r"[^A-Za-z0-9_.-]", "-", tag)[:128] for tag in wanted if tag))
        with tempfile.TemporaryDirectory() as directory:
            spec_file = write_spec(dict(request.spec), Path(directory) / "pipeline.yaml")
            uri = self.upload_template(repository, str(spec_file), tags)
        return f"Uploaded as {uri} (tags: {', '.join(tags)})"

    def template_uri(self, spec: Mapping[str, Any], tag: str | None) -> str | None:
        if tag is None:
            return None
        if not self.template_repository:
            raise ConfigError("--template needs run_config.template_repository", hint=_REPOSITORY_FORM)
        from kvx_runtime.compiler.kfp_reader import spec_pipeline_name

        name = spec_pipeline_name(spec)
        return f"{self.template_repository.rstrip('/')}/{name}/{tag}"

    def upload_template(self, repository: str, spec_file: str, tags: list[str]) -> str:
        """Push a compiled spec to an Artifact Registry KFP repository; returns its templateUri."""
        from pathlib import Path

        host = repository.rstrip("/")
        path = Path(spec_file)
        content = path.read_bytes()  # bytes, not a handle: a retried upload sends them again
        payload = self._request("POST", "", base=host, data={"tags": ",".join(tags)},
                                files={"content": (path.name, content, "application/octet-stream")},
                                service="Artifact Registry")
        package = str(payload.get("packageName", ""))
        version = str(payload.get("versionName", ""))
        if not package:
            raise ApiError(f"Artifact Registry answered the upload without a package name: {payload!r}"[:300])
        return f"{host}/{package}/{tags[0] if tags else version}"

    def logs_url(self, run: RunInfo, task: TaskInfo) -> str | None:
        job_id = (task.executor or "").rsplit("/", 1)[-1]
        if not job_id:
            return None
        query = (f'resource.type="ml_job"\nresource.labels.job_id="{job_id}"')
        return (f"https://console.cloud.google.com/logs/query;query={quote(query, safe='')}"
                f"?project={quote(self.project)}")
