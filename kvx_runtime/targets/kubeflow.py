"""Kubeflow Pipelines v2 through its REST API (``/apis/v2beta1``), without the kfp SDK.

``host`` is the API's base URL as the plugin family configures it (e.g.
``https://kubeflow.example.com/pipeline`` behind the central dashboard, or a port-forwarded
``http://localhost:8080``). Credentials come from :mod:`kvx_runtime.auth.kfp`. Bodies use
the API's proto field names (snake_case), as the published ``kfp-server-api`` client sends
them. Runs live in an experiment (``run_config.experiment_name``, created when missing) of a
namespace (``run_config.namespace`` on multi-user installations).

What differs from Vertex AI: KFP takes no failure policy per run; recurring runs cannot be
updated in place (an update replaces the recurring run, keeping its name); cron expressions
have a seconds field (a 5-field expression gets ``0`` seconds) and run in UTC; the job's
creation-time placeholder is not filled by every KFP release, so each run carries its save
version as the ``kvx_save_version`` parameter.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from kvx_runtime import settings
from kvx_runtime.compiler.platform import with_platform_spec
from kvx_runtime.config import is_kubernetes_name
from kvx_runtime.errors import ConfigError, UsageError
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
from kvx_runtime.targets.http import (
    ApiError,
    answered,
    checked_api_url,
    create_once,
    parse_time,
    request_json,
    session_with,
)
from kvx_runtime.versions import SAVE_VERSION_PARAMETER

if TYPE_CHECKING:
    from kvx_runtime.config import PluginConfig

__all__ = ["KubeflowTarget"]

log = get_logger(__name__)

API = "apis/v2beta1"
#: KFP's run states, as :data:`~kvx_runtime.targets.base.FINAL_STATES` and the rest name them.
_STATES = {"CANCELED": "CANCELLED", "CANCELING": "CANCELLING", "RUNTIME_STATE_UNSPECIFIED": "PENDING"}


def _state(value: Any) -> str:
    text = str(value or "RUNTIME_STATE_UNSPECIFIED")
    return _STATES.get(text, text)


def _no_templates() -> UsageError:
    return UsageError("--template is a Vertex AI (Artifact Registry) option",
                      hint="on Kubeflow Pipelines run-once sends the compiled spec itself")


def _description(pipeline: str) -> str:
    """What a submitted run's description says: its pipeline (list-pipelines filters on it)."""
    return f"{pipeline} (kvx-runtime)"


def _time(value: Any) -> datetime | None:
    """A time from the API; KFP sends the epoch for "not yet"."""
    text = str(value or "")
    return None if not text or text.startswith("1970-01-01") else parse_time(text)


def _equals(key: str, value: str) -> str:
    """A KFP list filter (JSON-serialized ``Filter``) matching ``key == value``."""
    return json.dumps({"predicates": [{"operation": "EQUALS", "key": key, "string_value": value}]})


def _kubernetes_service_account(name: str) -> str:
    """KFP runs pods as a Kubernetes service account: a DNS subdomain name, not a Google
    service account's email (what run_config.service_account holds for Vertex AI)."""
    if not is_kubernetes_name(name):
        kind = "a Google service account's email" if "@" in name else "not a Kubernetes name"
        raise ConfigError(f"run_config.service_account {name!r} is {kind}: Kubeflow Pipelines runs steps as a "
                          "Kubernetes service account of the namespace",
                          hint="set it to the Kubernetes service account's name (e.g. default-editor), or "
                          "leave it out for the namespace's default")
    return name


def _pipeline_spec(stored: Any) -> Any:
    """The pipeline spec of what KFP stores: a spec with a platform spec is kept as
    ``{"pipeline_spec", "platform_spec"}``."""
    if isinstance(stored, Mapping) and "pipeline_spec" in stored and "root" not in stored:
        return stored["pipeline_spec"]
    return stored


def _holds(version: Mapping[str, Any], spec: Any) -> bool:
    """Whether a KFP pipeline version stores ``spec``."""
    return bool(_pipeline_spec(version.get("pipeline_spec")) == spec)


def kfp_cron(expression: str) -> str:
    """KFP's 6-field cron (seconds first) from a 5- or 6-field expression."""
    fields = expression.split()
    if fields and fields[0].upper().startswith(("TZ=", "CRON_TZ=")):
        raise UsageError("Kubeflow Pipelines runs schedules in UTC; it takes no time zone",
                         hint="drop the TZ= prefix and write the cron in UTC")
    if len(fields) == 5:
        return " ".join(["0", *fields])
    if len(fields) == 6:
        return " ".join(fields)
    raise UsageError(f"cron expression {expression!r} has {len(fields)} fields",
                     hint="5 fields (minute hour day month weekday) or 6 with seconds first")


def save_version_now(now: datetime | None = None) -> str:
    """A save version for a run submitted now, in Kedro's format."""
    from kvx_runtime.versions import kedro_version

    return kedro_version((now or datetime.now(timezone.utc)).isoformat())


def _is_disabled(recurring_run: Mapping[str, Any]) -> bool:
    return str(recurring_run.get("status") or recurring_run.get("mode") or "").upper() in ("DISABLED", "DISABLE")


class KubeflowTarget(PipelineTarget):
    title = "Kubeflow Pipelines"

    def __init__(self, host: str, *, namespace: str | None = None, experiment_name: str | None = None,
                 run_name: str | None = None, auth: Any = None, session: Any = None,
                 attempts: int | None = None) -> None:
        self.host = checked_api_url(host, service="Kubeflow Pipelines", example="https://kubeflow.example.com/pipeline",
                                    config_hint="set host in conf/base/vertexai.yml (or kubeflow.yml)",
                                    credentials_hint="use DEX_USERNAME/DEX_PASSWORD, KF_PIPELINES_TOKEN or "
                                    "IAP_CLIENT_ID")
        self.namespace = namespace or None
        self.experiment_name = experiment_name or "Default"
        self.run_name = run_name or None
        self._auth = auth
        self._session = session
        self._attempts = attempts or settings.API_ATTEMPTS.get()
        self._experiment_id: str | None = None

    @classmethod
    def from_config(cls, config: PluginConfig) -> KubeflowTarget:
        run_config = config.run_config
        return cls(str(config.host or ""), namespace=run_config.namespace,
                   experiment_name=run_config.experiment_name, run_name=run_config.run_name)

    def run_once_name(self) -> str | None:
        """run_config.run_name (kedro-kubeflow's key), when set."""
        return self.run_name

    def template_uri(self, spec: Mapping[str, Any], tag: str | None) -> str | None:
        if tag is None:
            return None
        raise _no_templates()

    # --- transport --------------------------------------------------------------------------

    @property
    def session(self) -> Any:
        if self._session is None:
            from kvx_runtime.auth.kfp import kfp_auth_from_environment

            self._auth = self._auth or kfp_auth_from_environment(self.host)
            self._session = session_with(self._auth)
        return self._session

    def _request(self, method: str, path: str, *, params: Mapping[str, Any] | None = None, body: Any = None,
                 files: Any = None, attempts: int | None = None) -> Any:
        session = self.session
        return request_json(session, method, f"{self.host}/{API}/{path}", service=self.title,
                            what=f"{method} /{API}/{path}", params=params, body=body, files=files,
                            data={} if files is not None else None, attempts=attempts or self._attempts,
                            on_unauthorized=getattr(self._auth, "invalidate", None))

    def _pages(self, path: str, keys: tuple[str, ...], params: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
        token: str | None = None
        while True:
            page = self._request("GET", path, params={**params, **({"page_token": token} if token else {})})
            for key in keys:  # list recurring runs answers "recurringRuns" (camelCase), the rest snake_case
                yield from page.get(key) or []
            token = page.get("next_page_token") or page.get("nextPageToken")
            if not token:
                return

    def _scoped(self, **params: Any) -> dict[str, Any]:
        return {**({"namespace": self.namespace} if self.namespace else {}), **params}

    def _create(self, what: str, path: str, body: Mapping[str, Any] | None,
                find: Callable[[], Mapping[str, Any] | None], *, params: Mapping[str, Any] | None = None,
                files: Any = None) -> Mapping[str, Any]:
        """POST ``body`` (or ``files``) to create ``what``, never twice (:func:`create_once`)."""
        return dict(create_once(what, lambda: self._request("POST", path, params=params, body=body, files=files,
                                                            attempts=1),
                                find, attempts=self._attempts))

    # --- experiments ------------------------------------------------------------------------

    def experiment_id(self, *, create: bool = True) -> str | None:
        """The configured experiment's id; created when missing (with ``create``, else None)."""
        if self._experiment_id is None:
            found = self._find_experiment()
            if found is None:
                if not create:
                    return None
                body = {"display_name": self.experiment_name, **({"namespace": self.namespace} if self.namespace
                                                                   else {})}
                found = self._create("experiment", "experiments", body, self._find_experiment)
                log.info("experiment created", experiment=self.experiment_name, id=found.get("experiment_id"))
            self._experiment_id = answered(found, "experiment_id", self.title, "the experiment's look-up")
        return self._experiment_id

    def _find_experiment(self) -> Mapping[str, Any] | None:
        params = self._scoped(filter=_equals("display_name", self.experiment_name), page_size=100)
        for experiment in self._pages("experiments", ("experiments",), params):
            if experiment.get("display_name") == self.experiment_name:  # the filter is a hint, this is the rule
                return experiment
        return None

    # --- runs -----------------------------------------------------------------------------

    def _parameters(self, run: RunRequest) -> dict[str, Any]:
        parameters = dict(run.parameters)
        definitions = run.spec.get("root", {}).get("inputDefinitions", {}).get("parameters", {})
        if SAVE_VERSION_PARAMETER in definitions and not parameters.get(SAVE_VERSION_PARAMETER):
            parameters[SAVE_VERSION_PARAMETER] = save_version_now()
        return parameters

    def run_body(self, run: RunRequest) -> dict[str, Any]:
        if run.template_uri:
            raise _no_templates()
        if run.service_account:  # before any request: a refused name must not create the experiment
            _kubernetes_service_account(run.service_account)
        for setting, value, meaning in (
            ("network.vpc", run.network, "the pods use the cluster's network"),
            ("encryption_spec_key_name", run.encryption_key, "the run's data is encrypted as the cluster's "
             "storage is, not with this key"),
        ):
            if value:
                log.warning(f"run_config.{setting} is a Vertex AI setting that Kubeflow Pipelines does not "
                            f"apply: {meaning}", setting=f"run_config.{setting}")
        body: dict[str, Any] = {
            "display_name": run.run_id,
            "description": _description(run.display_name),
            "experiment_id": self.experiment_id(),
            "pipeline_spec": with_platform_spec(run.spec, run.platform_spec),
            "runtime_config": {"parameters": self._parameters(run)},
        }
        if run.service_account:
            body["service_account"] = run.service_account
        return body

    def submit(self, run: RunRequest) -> RunInfo:
        """Create the run; after a lost answer it is looked up by its display name (unique: the
        job id) before it is sent again, so a run is never started twice."""
        body = self.run_body(run)
        return self._run(self._create("run", "runs", body,
                                      lambda: self._find_run(body["display_name"], str(body["experiment_id"]))))

    def _find_run(self, display_name: str, experiment_id: str) -> Mapping[str, Any] | None:
        params = self._scoped(experiment_id=experiment_id, filter=_equals("display_name", display_name),
                              page_size=100)
        for run in self._pages("runs", ("runs",), params):
            if run.get("display_name") == display_name:
                return run
        return None

    def get(self, name: str) -> RunInfo:
        return self._run(self._request("GET", f"runs/{quote(name, safe='')}"))

    def list_runs(self, pipeline: str | None = None) -> Iterator[RunInfo]:
        experiment = self.experiment_id(create=False)
        if experiment is None:
            return
        params = self._scoped(experiment_id=experiment, sort_by="created_at desc", page_size=100)
        for run in self._pages("runs", ("runs",), params):
            # Submitted runs say which pipeline they run (run_body); display names may be anything.
            if pipeline is None or run.get("description") == _description(pipeline):
                yield self._run(run)

    def cancel(self, name: str) -> None:
        self._request("POST", f"runs/{quote(name, safe='')}:terminate")

    def _run(self, run: Mapping[str, Any]) -> RunInfo:
        tasks = []
        for detail in (run.get("run_details") or {}).get("task_details") or []:
            error = detail.get("error") or {}
            pods = [child.get("pod_name") for child in detail.get("child_tasks") or [] if child.get("pod_name")]
            tasks.append(TaskInfo(
                name=str(detail.get("display_name", "")),
                state=_state(detail.get("state")),
                error=str(error.get("message")) if error.get("message") else None,
                start=_time(detail.get("start_time")),
                end=_time(detail.get("end_time")),
                executor=", ".join(pods) or detail.get("pod_name") or None,
            ))
        error = run.get("error") or {}
        run_id = str(run.get("run_id", ""))
        state = _state(run.get("state"))
        failed = [task.name for task in tasks if task.state == "FAILED"]
        if state == "SUCCEEDED" and failed:
            # KFP before 2.4 (kubeflow/pipelines#11405) reports a run whose exit handler succeeded
            # as succeeded, though a task inside it failed: the run failed.
            state = "FAILED"
            error = error or {"message": f"task {', '.join(sorted(failed))} failed (the run's own state says "
                                         "SUCCEEDED: its exit task succeeded)"}
        return RunInfo(
            name=run_id,
            run_id=run_id,
            display_name=str(run.get("display_name", "")),
            state=state,
            create_time=_time(run.get("created_at")),
            start_time=_time(run.get("scheduled_at")) or _time(run.get("created_at")),
            end_time=_time(run.get("finished_at")),
            error=str(error.get("message")) if error.get("message") else None,
            tasks=tuple(tasks),
            spec=_pipeline_spec(run.get("pipeline_spec")),
            parameters=dict((run.get("runtime_config") or {}).get("parameters") or {}),
        )

    # --- recurring runs -------------------------------------------------------------------

    def _schedule(self, payload: Mapping[str, Any]) -> ScheduleInfo:
        cron = ((payload.get("trigger") or {}).get("cron_schedule") or {}).get("cron", "")
        return ScheduleInfo(name=str(payload.get("recurring_run_id", "")),
                            display_name=str(payload.get("display_name", "")),
                            state=str(payload.get("status") or payload.get("mode") or ""), cron=str(cron))

    def find_schedule(self, display_name: str) -> ScheduleInfo | None:
        found = self._schedules_named(display_name)
        return self._schedule(found[0]) if found else None

    def _schedules_named(self, display_name: str) -> list[Mapping[str, Any]]:
        experiment = self.experiment_id(create=False)
        if experiment is None:
            return []
        params = self._scoped(experiment_id=experiment, filter=_equals("display_name", display_name),
                              page_size=100)
        return [schedule for schedule in self._pages("recurringruns", ("recurringRuns", "recurring_runs"), params)
                if schedule.get("display_name") == display_name]  # the filter is a hint, this is the rule

    def schedule_body(self, request: ScheduleRequest) -> dict[str, Any]:
        if request.timezone:
            raise UsageError("Kubeflow Pipelines runs schedules in UTC; it takes no time zone",
                             hint="drop --timezone (and the schedule's timezone) and write the cron in UTC")
        if request.allow_queueing:
            raise UsageError("Kubeflow Pipelines recurring runs do not queue runs beyond max concurrency",
                             hint="drop --allow-queueing (and the schedule's allow_queueing)")
        if request.max_run_count is not None:
            raise UsageError("Kubeflow Pipelines recurring runs have no maximum run count",
                             hint="use --end-time instead")
        cron: dict[str, Any] = {"cron": kfp_cron(request.cron)}  # before any request: a bad cron creates nothing
        run = self.run_body(request.run)
        parameters = dict(run["runtime_config"]["parameters"])
        parameters.pop(SAVE_VERSION_PARAMETER, None)  # each scheduled run gets its creation time
        if request.start_time:
            cron["start_time"] = request.start_time
        if request.end_time:
            cron["end_time"] = request.end_time
        body: dict[str, Any] = {
            "display_name": request.display_name,
            "description": run["description"],
            "pipeline_spec": run["pipeline_spec"],
            "runtime_config": {"parameters": parameters},
            "trigger": {"cron_schedule": cron},
            "max_concurrency": str(request.max_concurrent_runs),
            "no_catchup": True,
            "mode": "ENABLE",
            "experiment_id": run["experiment_id"],
        }
        if self.namespace:
            body["namespace"] = self.namespace
        if "service_account" in run:
            body["service_account"] = run["service_account"]
        return body

    def upsert_schedule(self, request: ScheduleRequest) -> tuple[ScheduleInfo, bool]:
        body = self.schedule_body(request)
        before = self._schedules_named(request.display_name)
        known = {str(schedule.get("recurring_run_id")) for schedule in before}

        def made_by_an_earlier_try() -> Mapping[str, Any] | None:
            return next((schedule for schedule in self._schedules_named(request.display_name)
                         if str(schedule.get("recurring_run_id")) not in known), None)

        if before and all(_is_disabled(old) for old in before):
            body = {**body, "mode": "DISABLE"}  # paused (schedule --pause) stays paused
        created = self._schedule(self._create("recurring run", "recurringruns", body, made_by_an_earlier_try))
        # KFP cannot update a recurring run: the new one replaces the old ones (created first, so
        # that a refused body never leaves the pipeline unscheduled).
        for old in before:
            self._delete(f"recurringruns/{quote(str(old['recurring_run_id']), safe='')}")
        return created, not before

    def _delete(self, path: str) -> None:
        """DELETE; what is gone already (an earlier try whose answer was lost) is deleted."""
        try:
            self._request("DELETE", path)
        except ApiError as exc:
            if exc.status != 404:
                raise

    def set_schedule_state(self, name: str, action: str) -> ScheduleInfo | None:
        path = f"recurringruns/{quote(name, safe='')}"
        if action == "delete":
            self._delete(path)
            return None
        verbs = {"pause": "disable", "resume": "enable"}
        if action not in verbs:
            raise UsageError(f"unknown schedule action {action!r}")
        self._request("POST", f"{path}:{verbs[action]}")
        return self._schedule(self._request("GET", path))

    # --- pipelines --------------------------------------------------------------------------

    def upload(self, request: UploadRequest) -> str:
        """A new KFP pipeline, or a new version of the existing one, named by the user's tags, the
        project version, the commit and the time (KFP version names are unique per pipeline)."""
        import re
        import tempfile
        from pathlib import Path

        from kvx_runtime.compiler import write_spec
        from kvx_runtime.compiler.kfp_reader import spec_pipeline_name

        name = spec_pipeline_name(request.spec)
        stamp = datetime.now(timezone.utc).strftime("%Y%m%d%H%M%S")
        parts = [*request.tags, *([f"v{request.project_version}"] if request.project_version else []),
                 *([request.commit[:12]] if request.commit else []), stamp]
        version_name = "-".join(re.sub(r"[^A-Za-z0-9_.-]", "-", part) for part in parts)[:100]
        platform = dict(request.platform_spec) if request.platform_spec else None
        with tempfile.TemporaryDirectory() as directory:
            spec_file = write_spec(dict(request.spec), Path(directory) / "pipeline.yaml", platform)
            pipeline_id, version_id, created = self.upload_pipeline(name, str(spec_file), version_name,
                                                                    request.description)
        what = "pipeline" if created else "version"
        return f"Uploaded {name} as a new {what} (pipeline {pipeline_id}, version {version_name} {version_id})"

    def upload_pipeline(self, name: str, spec_file: str, version: str, description: str = "") -> tuple[str, str, bool]:
        """Upload the spec as pipeline ``name`` (new) or as its version ``version``; returns the
        pipeline id, the version id and whether the pipeline was created.

        After a lost answer or a 409 the upload counts as done only if the pipeline version found
        holds exactly this spec: a name taken by another spec is refused, never reused."""
        from pathlib import Path

        import yaml

        content = Path(spec_file).read_bytes()
        spec = next(iter(yaml.safe_load_all(content)), None)  # a platform spec may follow
        files = {"uploadfile": (Path(spec_file).name, content, "application/x-yaml")}
        pipeline = self._find_pipeline(name)
        if pipeline is None:
            def uploaded_by_an_earlier_try() -> Mapping[str, Any] | None:
                found = self._find_pipeline(name)
                newest = self._versions(str(found["pipeline_id"]), newest_only=True) if found else []
                return found if newest and _holds(newest[0], spec) else None

            created = self._create("pipeline", "pipelines/upload", None, uploaded_by_an_earlier_try, files=files,
                                   params=self._scoped(name=name, display_name=name, description=description))
            pipeline_id = answered(created, "pipeline_id", self.title, "the pipeline's upload")
            versions = self._versions(pipeline_id, newest_only=True)
            return pipeline_id, str(versions[0]["pipeline_version_id"]) if versions else "", True
        pipeline_id = answered(pipeline, "pipeline_id", self.title, "the pipeline's look-up")

        def version_by_an_earlier_try() -> Mapping[str, Any] | None:
            return next((found for found in self._versions(pipeline_id)
                         if found.get("display_name") == version and _holds(found, spec)), None)

        uploaded = self._create("pipeline version", "pipelines/upload_version", None, version_by_an_earlier_try,
                                files=files, params={"name": version, "display_name": version,
                                                     "pipelineid": pipeline_id, "description": description})
        return pipeline_id, answered(uploaded, "pipeline_version_id", self.title, "the version's upload"), False

    def _find_pipeline(self, name: str) -> Mapping[str, Any] | None:
        try:
            return dict(self._request("GET", f"pipelines/names/{quote(name, safe='')}", params=self._scoped()))
        except ApiError as exc:
            if exc.status != 404:
                raise
            return None

    def _versions(self, pipeline_id: str, *, newest_only: bool = False) -> list[dict[str, Any]]:
        params: dict[str, Any] = {"sort_by": "created_at desc"}
        if newest_only:
            params["page_size"] = 1
            page = self._request("GET", f"pipelines/{quote(pipeline_id, safe='')}/versions", params=params)
            return list(page.get("pipeline_versions") or [])
        return list(self._pages(f"pipelines/{quote(pipeline_id, safe='')}/versions", ("pipeline_versions",), params))

    # --- where to look ----------------------------------------------------------------------

    def _ui(self) -> str:
        """The KFP UI: behind the central dashboard /pipeline's UI is /_/pipeline."""
        if self.host.endswith("/pipeline"):
            return self.host[: -len("/pipeline")] + "/_/pipeline"
        return self.host

    def console_url(self, run: RunInfo | None = None) -> str:
        if run is None:
            return f"{self._ui()}/#/runs"
        return f"{self._ui()}/#/runs/details/{quote(run.run_id)}"

    def logs_url(self, run: RunInfo, task: TaskInfo) -> str | None:
        return self.console_url(run) if task.executor else None

    def step_run_id(self, run: RunInfo) -> str | None:
        return run.run_id  # KFP's run uuid is what its steps get as pipeline_job_uuid

    def job_name(self, run: RunInfo) -> str:
        from kvx_runtime.step.orchestrator import KubeflowPipelines

        return KubeflowPipelines().job_directory_name(run.display_name or run.run_id, run.run_id)
