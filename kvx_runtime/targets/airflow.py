"""Airflow through its REST API and its DAGs folder: Airflow 3 (Cloud Composer 3) by its API v2,
Airflow 2.10 (Cloud Composer 2) by its API v1, chosen by asking the server.

A compiled pipeline is a DAG file (:mod:`kvx_runtime.compiler.airflow_render`); publishing it is
writing ``<dag_id>.py`` into the DAGs folder (``run_config.dags_folder``: a local path, or
``gs://<Composer environment bucket>/dags`` through fsspec). Airflow's DAG processor then parses
it; a run can start only once Airflow has parsed *this* version (the DAG's source, as the API
returns it, equals the file written) and the DAG is unpaused (Airflow creates DAGs paused).

What differs from Vertex AI: a DAG's schedule lives in the DAG file (``schedule`` uploads it with
its cron and unpauses it; ``--pause``/``--resume`` flip ``is_paused``; ``--delete`` removes the
file and the DAG); ``run-once`` of a project that has a schedule publishes the DAG without it
under ``<dag_id>-run-once``, so the scheduled DAG is never replaced or started by it. A run is
named ``<dag_id>/<run_id>``; the steps' run id is Airflow's run id. Credentials:
:mod:`kvx_runtime.auth.airflow`. What differs between the two APIs (paths, field names, what a
list can filter on) lives in :class:`ApiV2` and :class:`ApiV1`; Airflow 2 older than 2.10 is
refused in one line.
"""

from __future__ import annotations

import ast
import time
from collections.abc import Iterator, Mapping
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from kvx_runtime import settings
from kvx_runtime.errors import ConfigError, InfrastructureError, KvxError, UsageError
from kvx_runtime.log import get_logger
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
from kvx_runtime.targets.http import ApiError, checked_api_url, parse_time, request_json, session_with

if TYPE_CHECKING:
    from kvx_runtime.config import PluginConfig

__all__ = ["DAG_FILE_KEY", "DAG_ID_KEY", "AirflowTarget", "ApiV1", "ApiV2", "dag_spec"]

log = get_logger(__name__)

#: The oldest Airflow 2 this client talks to (Cloud Composer 2's newest line; the DAG files are
#: checked to parse on it).
OLDEST_AIRFLOW_2 = (2, 10)
#: What a :class:`RunRequest`'s or :class:`UploadRequest`'s ``spec`` holds for this target.
DAG_ID_KEY = "dag_id"
DAG_FILE_KEY = "dag_file"
#: Airflow's run and task states, as :data:`~kvx_runtime.targets.base.FINAL_STATES` and the rest name them.
_RUN_STATES = {"queued": "PENDING", "running": "RUNNING", "success": "SUCCEEDED", "failed": "FAILED"}
_TASK_STATES = {
    "success": "SUCCEEDED", "failed": "FAILED", "upstream_failed": "SKIPPED", "skipped": "SKIPPED",
    "removed": "SKIPPED", "running": "RUNNING", "restarting": "RUNNING", "deferred": "RUNNING",
    "up_for_retry": "RUNNING", "up_for_reschedule": "RUNNING", "awaiting_input": "RUNNING",
    "queued": "PENDING", "scheduled": "PENDING",
}

#: Task states a cancel has nothing to stop in.
_FINISHED_TASK_STATES = frozenset(raw for raw, state in _TASK_STATES.items() if state in FINAL_STATES)


def dag_spec(dag_id: str, text: str) -> dict[str, str]:
    """The ``spec`` of a run or upload request for this target: the DAG file to publish."""
    return {DAG_ID_KEY: dag_id, DAG_FILE_KEY: text}


def _iso(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


class ApiV2:
    """Airflow 3's REST API: what differs from API v1, in one place."""

    prefix = "api/v2"
    #: Newest run first.
    runs_order = "-run_after"

    def source_path(self, dag_id: str, details: Mapping[str, Any]) -> str:
        return f"dagSources/{quote(dag_id, safe='')}"

    def import_error_filter(self, dag_id: str) -> dict[str, Any]:
        return {"filename_pattern": f"{dag_id}.py"}

    def run_id_filter(self, run_id: str) -> dict[str, Any]:
        return {"run_id_pattern": run_id}

    def schedule(self, details: Mapping[str, Any]) -> str:
        """The DAG's schedule as Airflow summarises it ("" when it has none)."""
        summary = str(details.get("timetable_summary") or "")
        return "" if summary in ("None", "null") else summary

    def next_run_after(self, details: Mapping[str, Any]) -> Any:
        return details.get("next_dagrun_run_after")

    def created(self, run: Mapping[str, Any]) -> Any:
        return run.get("queued_at") or run.get("run_after")

    def mark_failed(self) -> dict[str, Any]:
        """The body that marks one task instance failed (PATCH .../taskInstances/<task>)."""
        return {"new_state": "failed"}

    # The web UI's pages (Airflow 3's React UI).
    def dags_page(self, host: str) -> str:
        return f"{host}/dags"

    def run_page(self, host: str, dag_id: str, run_id: str) -> str:
        return f"{host}/dags/{quote(dag_id, safe='')}/runs/{quote(run_id, safe='')}"

    def task_page(self, host: str, dag_id: str, run_id: str, task_id: str) -> str:
        return f"{self.run_page(host, dag_id, run_id)}/tasks/{quote(task_id, safe='')}"

    def clear_unfinished(self, run_id: str, task_ids: list[str]) -> dict[str, Any]:
        """The body that clears the run's ``task_ids`` and everything downstream of them, finished
        or not (the MLflow end task must run again), with the DAG as published now (Airflow 3
        would otherwise rerun the run's own DAG version)."""
        return {"dry_run": False, "dag_run_id": run_id, "task_ids": task_ids, "only_failed": False,
                "include_downstream": True, "reset_dag_runs": True, "run_on_latest_version": True}

    def log_lines(self, answer: Any) -> list[str]:
        """A task log's lines: API v2 answers structured events (``{"event": ...}``) or strings."""
        lines: list[str] = []
        for entry in (answer.get("content") if isinstance(answer, dict) else None) or []:
            text = entry.get("event") if isinstance(entry, dict) else entry
            if text:
                lines.extend(part for part in str(text).splitlines() if part.strip())
        return lines


class ApiV1(ApiV2):
    """Airflow 2's REST API (2.10): sources by file token, no server-side filter of import errors
    or run ids, the schedule as an object, a log as the text of a list of (host, text) pairs."""

    prefix = "api/v1"
    runs_order = "-execution_date"

    def source_path(self, dag_id: str, details: Mapping[str, Any]) -> str:
        return f"dagSources/{quote(str(details.get('file_token') or ''), safe='')}"

    def import_error_filter(self, dag_id: str) -> dict[str, Any]:
        return {"order_by": "-import_error_id"}

    def run_id_filter(self, run_id: str) -> dict[str, Any]:
        return {"order_by": self.runs_order}

    def schedule(self, details: Mapping[str, Any]) -> str:
        interval = details.get("schedule_interval")
        if isinstance(interval, dict):
            return str(interval.get("value") or "")
        return str(details.get("timetable_description") or "") if interval else ""

    def next_run_after(self, details: Mapping[str, Any]) -> Any:
        return details.get("next_dagrun_create_after")

    def created(self, run: Mapping[str, Any]) -> Any:
        return run.get("queued_at") or run.get("logical_date") or run.get("execution_date")

    def mark_failed(self) -> dict[str, Any]:
        return {"new_state": "failed", "dry_run": False}  # API v1 only reports what it would do by default

    # Airflow 2's Flask UI: a run and a task's log are views of the DAG's grid.
    def dags_page(self, host: str) -> str:
        return f"{host}/home"

    def run_page(self, host: str, dag_id: str, run_id: str) -> str:
        return f"{host}/dags/{quote(dag_id, safe='')}/grid?dag_run_id={quote(run_id, safe='')}"

    def task_page(self, host: str, dag_id: str, run_id: str, task_id: str) -> str:
        return f"{self.run_page(host, dag_id, run_id)}&task_id={quote(task_id, safe='')}&tab=logs"

    def clear_unfinished(self, run_id: str, task_ids: list[str]) -> dict[str, Any]:
        body = super().clear_unfinished(run_id, task_ids)
        del body["run_on_latest_version"]  # Airflow 2 reruns the DAG as it is parsed now
        return body

    def log_lines(self, answer: Any) -> list[str]:
        content = answer.get("content") if isinstance(answer, dict) else None
        if not isinstance(content, str):
            return []
        try:  # str() of [(host, text), ...]: what Airflow 2's log endpoint puts in its JSON
            chunks = ast.literal_eval(content)
        except (ValueError, SyntaxError):
            chunks = [("", content)]
        texts = [chunk[1] if isinstance(chunk, (tuple, list)) and len(chunk) == 2 else chunk
                 for chunk in chunks if chunk] if isinstance(chunks, list) else [content]
        return [line for text in texts for line in str(text).splitlines() if line.strip()]


def _dags_folder_error(action: str, location: str, exc: BaseException) -> KvxError:
    """The DAGs folder's failure as one line: refused credentials are the caller's to fix (exit 2),
    anything else may pass (exit 3)."""
    from kvx_runtime.failures import is_refused
    from kvx_runtime.log import redact

    text = redact(f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}")
    if is_refused(exc):
        return ConfigError(f"cannot {action} {location}: the credentials were refused ({text})",
                           hint="gcloud auth application-default login, or GOOGLE_APPLICATION_CREDENTIALS")
    return InfrastructureError(f"cannot {action} {location}: {text}")


def _step_error(line: str) -> str | None:
    """The message of a kvx-runtime ERROR log line (JSON, after whatever Airflow prefixed)."""
    import json

    if '"severity": "ERROR"' not in line:
        return None
    try:
        record = json.loads(line[line.index('{"'):])
    except ValueError:
        return line
    return str(record.get("message") or line) if isinstance(record, dict) else line


class AirflowTarget(PipelineTarget):
    title = "Airflow"

    def __init__(self, host: str, *, dags_folder: str | None = None, dag_id: str | None = None,
                 auth: Any = None, attempts: int | None = None, api: ApiV2 | None = None) -> None:
        """``api``: the server's REST API when known (else asked on the first request)."""
        self.host = checked_api_url(host, service="Airflow", example="https://airflow.example.com",
                                    config_hint="set host in conf/base/airflow-k8s.yml",
                                    credentials_hint="use KVX_AIRFLOW_TOKEN or KVX_AIRFLOW_USERNAME/PASSWORD")
        self.dags_folder = dags_folder.rstrip("/") if dags_folder else None
        self.dag_id = dag_id
        self._auth = auth
        self._session: Any = None
        self._attempts = attempts or settings.API_ATTEMPTS.get()
        self._api = api

    @classmethod
    def from_config(cls, config: PluginConfig) -> AirflowTarget:
        run_config = config.run_config
        return cls(str(config.host or ""), dags_folder=getattr(run_config, "dags_folder", None),
                   dag_id=getattr(run_config, "dag_id", None))

    # --- transport --------------------------------------------------------------------------

    @property
    def session(self) -> Any:
        if self._session is None:
            from kvx_runtime.auth.airflow import airflow_auth_from_environment

            self._auth = self._auth or airflow_auth_from_environment(self.host)
            self._session = session_with(self._auth)
        return self._session

    @property
    def api(self) -> ApiV2:
        """The server's REST API (asked once)."""
        if self._api is None:
            self._api = self._ask_api()
        return self._api

    def _request(self, method: str, path: str, *, params: Mapping[str, Any] | None = None,
                 body: Any = None) -> Any:
        return self._call(method, f"{self.api.prefix}/{path}", params=params, body=body)

    def _call(self, method: str, path: str, *, params: Mapping[str, Any] | None = None, body: Any = None) -> Any:
        return request_json(self.session, method, f"{self.host}/{path}", service=self.title,
                            what=f"{method} /{path.split('?')[0]}", params=params, body=body,
                            attempts=self._attempts, on_unauthorized=getattr(self._auth, "invalidate", None),
                            # Airflow answers a JWT it cannot verify (expired, another key) with 403.
                            unauthorized=(401, 403))

    def _ask_api(self) -> ApiV2:
        """Airflow 3's API v2, else Airflow 2's v1 (2.10 or newer), else a one-line error saying
        what answered instead."""
        try:
            self._call("GET", f"{ApiV2.prefix}/version")
            return ApiV2()
        except ApiError as exc:
            if exc.status != 404:
                raise
        try:
            answer = self._call("GET", f"{ApiV1.prefix}/version")
        except ApiError:
            raise ConfigError(f"{self.host} has no Airflow REST API (/{ApiV2.prefix} nor /{ApiV1.prefix})",
                              hint="set host to the Airflow web server / API server URL") from None
        version = str(answer.get("version") or "") if isinstance(answer, dict) else ""
        numbers = tuple(int(part) for part in version.split(".")[:2] if part.isdigit())
        if len(numbers) == 2 and numbers < OLDEST_AIRFLOW_2:
            oldest = ".".join(map(str, OLDEST_AIRFLOW_2))
            raise ConfigError(f"{self.host} is Airflow {version}: this release talks to Airflow {oldest} and newer",
                              hint=f"upgrade to Airflow {oldest} (Cloud Composer 2) or 3, or copy the compiled DAG "
                              "file into the DAGs folder yourself")
        for_airflow_2 = getattr(self._auth, "for_airflow_2", None)
        if for_airflow_2 is not None:
            for_airflow_2()
        log.debug("Airflow 2 REST API (v1)", version=version)
        return ApiV1()

    # --- DAG files ----------------------------------------------------------------------------

    def _folder(self) -> str:
        if not self.dags_folder:
            raise ConfigError("no DAGs folder to upload the DAG to",
                              hint="set run_config.dags_folder in airflow-k8s.yml (a path, or "
                              "gs://<Composer environment bucket>/dags)")
        return self.dags_folder

    def _dag_file(self, dag_id: str) -> str:
        return f"{self._folder()}/{dag_id}.py"

    def publish(self, dag_id: str, text: str) -> str:
        """Write the DAG file into the DAGs folder, whole or not at all (a DAG processor parsing a
        half-written file would record an import error, which the wait for the parse takes as
        the file's); returns where it went."""
        import fsspec

        from kvx_runtime.storage.store import write_file_whole

        location = self._dag_file(dag_id)
        try:
            filesystem, path = fsspec.core.url_to_fs(location)
            filesystem.makedirs(filesystem._parent(path), exist_ok=True)
            write_file_whole(filesystem, path, text.encode("utf-8"))
        except ImportError as exc:
            raise ConfigError(f"cannot write {location}: {exc}", hint="install gcsfs for gs:// DAG folders") from None
        except Exception as exc:  # OSError, and the store's own (google-auth's TransportError, RefreshError...)
            raise _dags_folder_error("write the DAG file", location, exc) from None
        log.info("DAG file written", dag_id=dag_id, location=location)
        return location

    def remove_dag_file(self, dag_id: str) -> bool:
        """Delete the DAG file from the DAGs folder; False if it was not there."""
        import fsspec

        location = self._dag_file(dag_id)
        try:
            filesystem, path = fsspec.core.url_to_fs(location)
            if not filesystem.exists(path):
                return False
            filesystem.rm(path)
        except ImportError as exc:
            raise ConfigError(f"cannot remove {location}: {exc}", hint="install gcsfs for gs:// DAG folders") from None
        except Exception as exc:
            raise _dags_folder_error("remove the DAG file", location, exc) from None
        return True

    def pipeline_name(self, package_name: str, pipeline: str) -> str:
        from kvx_runtime.compiler.names import pipeline_dag_id

        return pipeline_dag_id(self.dag_id, package_name, pipeline)

    def dag(self, dag_id: str) -> dict[str, Any] | None:
        """The DAG's details, or None while Airflow does not know it."""
        path = f"dags/{quote(dag_id, safe='')}"
        try:
            found: dict[str, Any] = self._request("GET", f"{path}/details")
        except ApiError as exc:
            if exc.status == 404:
                return None
            # Airflow 2.10 answers 500 for the details of a DAG deleted from its database while
            # its webserver still holds the parsed DAG: the DAG's own record says it is gone.
            if exc.status >= 500 and self._missing(path):
                return None
            raise
        return found

    def _missing(self, path: str) -> bool:
        try:
            self._request("GET", path)
        except ApiError as exc:
            if exc.status == 404:
                return True
            raise
        return False

    def import_error(self, dag_id: str, since: datetime | None = None) -> str | None:
        """The last line of Airflow's import error for the DAG's file (recorded at ``since`` or
        later), if it has one."""
        for error in self._pages("importErrors", "import_errors", self.api.import_error_filter(dag_id)):
            if str(error.get("filename", "")).rsplit("/", 1)[-1] != f"{dag_id}.py":
                continue
            recorded = parse_time(error.get("timestamp"))
            if since is not None and recorded is not None and recorded < since:
                continue  # an older version's error, not yet replaced by a parse of this one
            lines = [line.strip() for line in str(error.get("stack_trace", "")).splitlines() if line.strip()]
            return lines[-1] if lines else "an import error without a message"
        return None

    def wait_parsed(self, dag_id: str, text: str, written: datetime, timeout: float | None = None) -> dict[str, Any]:
        """Wait until Airflow has parsed this version of the DAG file and will run it (the DAG's
        source, as the API returns it, is ``text``, and the version in its doc_md is the file's:
        Airflow stores a DAG's tasks with its doc_md, at most every
        ``[core] min_serialized_dag_update_interval``, its source at every parse); ``written``:
        when the file was written. Returns the DAG's details. An import error of the file is a
        ConfigError naming it; no parse within ``timeout`` (default KVX_AIRFLOW_PARSE_TIMEOUT)
        an InfrastructureError."""
        from kvx_runtime.compiler.airflow_render import dag_version

        limit = settings.AIRFLOW_PARSE_TIMEOUT.get() if timeout is None else timeout
        deadline = time.monotonic() + limit
        interval = min(2.0, settings.WATCH_INTERVAL.get())
        version = dag_version(text)
        asked_at: float | None = None
        while True:
            details = self.dag(dag_id)
            if (details is not None and (version is None or dag_version(details.get("doc_md")) == version)
                    and self._source(dag_id, details) == text):
                return details
            error = self.import_error(dag_id, since=written)
            if error is not None:
                raise ConfigError(f"Airflow cannot import the DAG file {dag_id}.py: {error}",
                                  hint="parse it where Airflow and the provider of the same versions are installed "
                                  "(docs/airflow.md) to see the whole error")
            now = time.monotonic()
            if details is not None and details.get("file_token") and (asked_at is None or now - asked_at >= 10):
                # Airflow re-reads a known file on its own only every min_file_process_interval.
                self._request("PUT", f"parseDagFile/{quote(str(details['file_token']), safe='')}")
                asked_at = now
            if now >= deadline:
                state = "an older version of the DAG" if details is not None else "no DAG of that id"
                raise InfrastructureError(
                    f"Airflow has not parsed the new DAG file {dag_id}.py within {limit:g} s (it shows {state})",
                    hint="the DAG processor looks for new files every [dag_processor] refresh_interval seconds "
                    "(300 by default); KVX_AIRFLOW_PARSE_TIMEOUT sets this wait")
            time.sleep(interval)

    def _source(self, dag_id: str, details: Mapping[str, Any]) -> str | None:
        try:
            source = self._request("GET", self.api.source_path(dag_id, details))
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise
        content = source.get("content")
        return str(content) if content is not None else None

    def set_paused(self, dag_id: str, paused: bool) -> dict[str, Any]:
        answer: dict[str, Any] = self._request("PATCH", f"dags/{quote(dag_id, safe='')}",
                                               body={"is_paused": paused})
        return answer

    def _publish_parsed(self, spec: Mapping[str, Any]) -> tuple[str, dict[str, Any], bool]:
        """Publish the DAG of ``spec`` and wait for Airflow to parse it; returns its id, its
        details and whether Airflow knew no DAG of that id before."""
        dag_id, text = str(spec[DAG_ID_KEY]), str(spec[DAG_FILE_KEY])
        existed = self.dag(dag_id) is not None
        written = datetime.now(timezone.utc)
        location = self.publish(dag_id, text)
        details = self.wait_parsed(dag_id, text, written)
        log.info("DAG parsed by Airflow", dag_id=dag_id, location=location, paused=details.get("is_paused"))
        return dag_id, details, not existed

    # --- runs ---------------------------------------------------------------------------------

    def submit(self, run: RunRequest) -> RunInfo:
        """Publish the DAG of ``run.spec``, wait until Airflow parsed it, unpause it, and
        trigger a run with ``run.parameters`` as its ``conf``."""
        dag_id, details, _ = self._publish_parsed(run.spec)
        if details.get("is_paused"):
            self.set_paused(dag_id, False)
        body = {"dag_run_id": run.run_id, "logical_date": _iso(datetime.now(timezone.utc)),
                "conf": dict(run.parameters)}
        try:
            created = self._request("POST", f"dags/{quote(dag_id, safe='')}/dagRuns", body=body)
        except ApiError as exc:
            if exc.status != 409:
                raise
            created = self._created_by_a_lost_answer(dag_id, run.run_id, run.parameters)
            if created is None:
                raise UsageError(f"Airflow already has a run {run.run_id} of DAG {dag_id}",
                                 hint="run again: each run-once gets a new run id") from None
        return self._run_info(created, tasks=())

    def _created_by_a_lost_answer(self, dag_id: str, run_id: str, conf: Mapping[str, Any]) -> dict[str, Any] | None:
        """The run ``run_id`` where it is this submission's own: a retried trigger whose first
        answer was lost (the run made, the answer not received) meets its own run as a conflict.
        Taken as ours when it has this run's conf (the id names the DAG and the second it was
        made); None otherwise."""
        try:
            found: dict[str, Any] = self._request(
                "GET", f"dags/{quote(dag_id, safe='')}/dagRuns/{quote(run_id, safe='')}")
        except ApiError:
            return None
        if dict(found.get("conf") or {}) != dict(conf):
            return None
        log.info("the run was created by an earlier attempt whose answer was lost: it is this run", dag_id=dag_id,
                 run_id=run_id)
        return found

    def _split(self, name: str) -> tuple[str, str]:
        """``dag_id/run_id`` (or a run id of this project's DAG) -> (dag_id, run_id)."""
        if "/" in name:
            dag_id, _, run_id = name.partition("/")
            return dag_id, run_id
        # The configured DAG and its run-once copy first (one request each: Airflow 2's API cannot
        # filter runs by id, so the listing below pages through every run); then every DAG, as
        # the run may be another pipeline's.
        from kvx_runtime.config.airflow import RUN_ONCE_SUFFIX

        for dag_id in (self.dag_id, f"{self.dag_id}{RUN_ONCE_SUFFIX}") if self.dag_id else ():
            try:
                self._request("GET", f"dags/{quote(dag_id, safe='')}/dagRuns/{quote(name, safe='')}")
            except ApiError as exc:
                if exc.status == 404:
                    continue
                raise
            return dag_id, name
        runs = [run for run in self._pages("dags/~/dagRuns", "dag_runs", self.api.run_id_filter(name))
                if run.get("dag_run_id") == name]
        if len(runs) != 1:
            raise UsageError(f"{'no' if not runs else 'more than one'} Airflow run with id {name!r}",
                             hint="name it as <dag_id>/<run_id>, as run-once and list-pipelines print it")
        return str(runs[0]["dag_id"]), name

    def get(self, name: str) -> RunInfo:
        dag_id, run_id = self._split(name)
        path = f"dags/{quote(dag_id, safe='')}/dagRuns/{quote(run_id, safe='')}"
        try:
            run = self._request("GET", path)
        except ApiError as exc:
            if exc.status == 404:
                raise UsageError(f"Airflow has no run {run_id} of DAG {dag_id}") from None
            raise
        tasks = tuple(self._task_info(item) for item in self._pages(f"{path}/taskInstances", "task_instances", {}))
        return self._run_info(run, tasks=tasks)

    def _pages(self, path: str, key: str, params: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
        """Every item of a list endpoint (Airflow caps ``limit`` at 100 without saying so)."""
        offset = 0
        while True:
            page = self._request("GET", path, params={**params, "limit": 100, "offset": offset})
            items = page.get(key) or []
            yield from items
            offset += len(items)
            if not items or offset >= int(page.get("total_entries") or 0):
                return

    def _task_info(self, item: Mapping[str, Any]) -> TaskInfo:
        raw = str(item.get("state") or "")
        state = _TASK_STATES.get(raw, "PENDING")
        error = None
        if raw == "upstream_failed":
            error = "not run: an upstream task failed"
        elif raw == "failed":
            error = f"failed (try {item.get('try_number') or 1} of {int(item.get('max_tries') or 0) + 1})"
        return TaskInfo(name=str(item.get("task_id")), state=state, error=error,
                        start=parse_time(item.get("start_date")), end=parse_time(item.get("end_date")),
                        executor=f"try {item.get('try_number')}" if item.get("try_number") else None)

    def _run_info(self, run: Mapping[str, Any], tasks: tuple[TaskInfo, ...]) -> RunInfo:
        dag_id, run_id = str(run.get("dag_id")), str(run.get("dag_run_id"))
        return RunInfo(
            name=f"{dag_id}/{run_id}", run_id=run_id, display_name=dag_id,
            state=_RUN_STATES.get(str(run.get("state") or "queued"), "PENDING"),
            create_time=parse_time(self.api.created(run)),
            start_time=parse_time(run.get("start_date")), end_time=parse_time(run.get("end_date")),
            tasks=tasks, labels={"dag_id": dag_id}, parameters=dict(run.get("conf") or {}),
        )

    def list_runs(self, pipeline: str | None = None) -> Iterator[RunInfo]:
        dag = "~" if pipeline is None else quote(pipeline, safe="")
        for run in self._pages(f"dags/{dag}/dagRuns", "dag_runs", {"order_by": self.api.runs_order}):
            yield self._run_info(run, tasks=())

    def cancel(self, name: str) -> None:
        """Stop the run. A running run's unfinished body tasks are marked failed (Airflow kills
        those running and starts no more of them) and its exit tasks run, as Vertex AI runs its
        exit handler on a cancel: the MLflow run ends FAILED, the on-exit pipeline runs. Marking
        the run itself failed would skip them (the MLflow run left RUNNING for good). A run not
        started yet (nothing of it ran), or without exit tasks, is marked failed."""
        from kvx_runtime.compiler.airflow_render import EXIT_TASKS

        dag_id, run_id = self._split(name)
        path = f"dags/{quote(dag_id, safe='')}/dagRuns/{quote(run_id, safe='')}"
        run = self._request("GET", path)
        tasks = list(self._pages(f"{path}/taskInstances", "task_instances", {})) \
            if run.get("state") == "running" else []
        if not any(task.get("task_id") in EXIT_TASKS for task in tasks):
            self._request("PATCH", path, body={"state": "failed"})
            return
        for task in tasks:
            if task.get("task_id") in EXIT_TASKS or task.get("state") in _FINISHED_TASK_STATES:
                continue
            try:
                self._request("PATCH", f"{path}/taskInstances/{quote(str(task['task_id']), safe='')}",
                              body=self.api.mark_failed())
            except ApiError as exc:
                if exc.status not in (400, 404, 409):  # finished or gone meanwhile: nothing to stop
                    raise

    def rerun_unfinished(self, run: RunInfo) -> RunInfo | None:
        """Clear the run's tasks that did not succeed and everything downstream of them (the
        MLflow end and outcome tasks included): Airflow runs them again in the same DAG run (its
        run id, conf and MLflow run), with the DAG file as it is published now."""
        dag_id, run_id = self._split(run.name)
        unfinished = [task.name for task in run.tasks if task.state != "SUCCEEDED"]
        self._request("POST", f"dags/{quote(dag_id, safe='')}/clearTaskInstances",
                      body=self.api.clear_unfinished(run_id, unfinished))
        return self.get(run.name)

    # --- schedules ----------------------------------------------------------------------------

    def _schedule_info(self, details: Mapping[str, Any]) -> ScheduleInfo:
        return ScheduleInfo(name=str(details.get("dag_id")), display_name=str(details.get("dag_id")),
                            state="PAUSED" if details.get("is_paused") else "ACTIVE",
                            cron=self.api.schedule(details),
                            next_run_time=parse_time(self.api.next_run_after(details)))

    def find_schedule(self, display_name: str) -> ScheduleInfo | None:
        details = self.dag(display_name)
        if details is None or not self.api.schedule(details):
            return None
        return self._schedule_info(details)

    def upsert_schedule(self, request: ScheduleRequest) -> tuple[ScheduleInfo, bool]:
        """Publish the DAG (its schedule is in the file), wait for Airflow to parse it, unpause it."""
        dag_id, details, created = self._publish_parsed(request.run.spec)
        if details.get("is_paused"):
            details = {**details, **self.set_paused(dag_id, False)}
        return self._schedule_info(details), created

    def set_schedule_state(self, name: str, action: str) -> ScheduleInfo | None:
        if action in ("pause", "resume"):
            details = self.set_paused(name, action == "pause")
            return self._schedule_info(details)
        if action != "delete":
            raise UsageError(f"unknown schedule action {action!r}")
        # Airflow refuses to delete a DAG with running tasks; asked first, so nothing is removed then.
        try:
            active = [run for state in ("running", "queued")
                      for run in self._pages(f"dags/{quote(name, safe='')}/dagRuns", "dag_runs", {"state": state})]
        except ApiError as exc:
            if exc.status != 404:
                raise
            active = []  # Airflow has no such DAG: only its file (if any) is left to remove
        if active:
            raise UsageError(f"DAG {name} has {len(active)} run(s) not finished ({active[0].get('dag_run_id')}...)",
                             hint="cancel them first (cancel RUN), or wait for them to end")
        # The file first: while it is in the DAGs folder, Airflow would parse the DAG back.
        self.remove_dag_file(name)
        self._delete_dag(name)
        return None

    #: Consecutive checks that must find a deleted DAG gone before ``schedule --delete`` says so.
    _GONE_CHECKS = 3

    def _delete_dag(self, name: str) -> None:
        """Delete the DAG's record, and again if it comes back: a parse of its file that began
        before the file was removed stores the DAG after the delete (seen on Airflow 3). Done when
        a few checks in a row find it gone, within KVX_AIRFLOW_PARSE_TIMEOUT."""
        deadline = time.monotonic() + settings.AIRFLOW_PARSE_TIMEOUT.get()
        interval = min(1.0, settings.WATCH_INTERVAL.get())
        gone = 0
        while True:
            if gone == 0:
                try:
                    self._request("DELETE", f"dags/{quote(name, safe='')}")
                except ApiError as exc:
                    if exc.status != 404:
                        raise
            time.sleep(interval)
            if self.dag(name) is None:
                gone += 1
                if gone >= self._GONE_CHECKS:
                    return
                continue
            gone = 0
            if time.monotonic() >= deadline:
                raise InfrastructureError(
                    f"Airflow still shows DAG {name} after its file was removed and the DAG deleted",
                    hint="its DAG processor may read another copy of the file (another DAGs folder or bundle); "
                    "delete it there, then run schedule --delete again")

    # --- uploads ------------------------------------------------------------------------------

    def check_upload(self) -> None:
        self._folder()

    def upload(self, request: UploadRequest) -> str:
        dag_id, details, created = self._publish_parsed(request.spec)
        paused = " (paused: `schedule --resume` starts its schedule)" if details.get("is_paused") else ""
        return (f"DAG {dag_id} {'created' if created else 'updated'} from {self._dag_file(dag_id)}, parsed by "
                f"Airflow{paused}")

    # --- where to look ------------------------------------------------------------------------

    def console_url(self, run: RunInfo | None = None) -> str:
        if run is None:  # a DAG's page has one address in both UIs
            return f"{self.host}/dags/{quote(self.dag_id, safe='')}" if self.dag_id else self.api.dags_page(self.host)
        return self.api.run_page(self.host, run.labels.get("dag_id") or run.display_name, run.run_id)

    def job_name(self, run: RunInfo) -> str:
        return run.labels.get("dag_id") or run.display_name

    def step_run_id(self, run: RunInfo) -> str | None:
        return run.run_id

    def job_directory(self, run: RunInfo) -> str:
        from kvx_runtime.step.orchestrator import Airflow

        return Airflow().job_directory_name(self.job_name(run), run.run_id)

    def logs_url(self, run: RunInfo, task: TaskInfo) -> str | None:
        return self.api.task_page(self.host, run.labels.get("dag_id") or run.display_name, run.run_id, task.name)

    def _try_number(self, task: TaskInfo) -> int:
        text = (task.executor or "").removeprefix("try ")
        return int(text) if text.isdigit() else 1

    def task_errors(self, run: RunInfo, task: TaskInfo, limit: int = 5) -> list[str]:
        """What the task's log (its last try) says went wrong: the step's own error lines when
        it logged some (kvx-runtime's verdict is the last; Airflow's own epilogue follows it),
        else the log's last lines."""
        dag_id = run.labels.get("dag_id") or run.display_name
        path = (f"dags/{quote(dag_id, safe='')}/dagRuns/{quote(run.run_id, safe='')}/taskInstances/"
                f"{quote(task.name, safe='')}/logs/{self._try_number(task)}")
        try:
            answer = self._request("GET", path, params={"full_content": "true"})
        except ApiError as exc:
            log.info("the task's log cannot be read", task=task.name, error=str(exc)[:300])
            return []
        lines = self.api.log_lines(answer)
        errors = [message for line in lines if (message := _step_error(line)) is not None]
        return [line[:500] for line in (errors or lines)[-limit:]]

    def replay_command(self, run: RunInfo, task: TaskInfo) -> str | None:
        """The task's exec-node command as Airflow rendered it (its rendered fields)."""
        import shlex

        from kvx_runtime.step.invocation import ExecNodeInvocation, InvocationError

        dag_id = run.labels.get("dag_id") or run.display_name
        path = (f"dags/{quote(dag_id, safe='')}/dagRuns/{quote(run.run_id, safe='')}/taskInstances/"
                f"{quote(task.name, safe='')}")
        try:
            fields = self._request("GET", path).get("rendered_fields") or {}
        except ApiError:
            return None
        if isinstance(fields.get("bash_command"), str):
            try:
                argv = shlex.split(fields["bash_command"])
            except ValueError:
                return None
        else:
            argv = [str(part) for part in [*(fields.get("cmds") or []), *(fields.get("arguments") or [])]]
        try:
            return ExecNodeInvocation.parse(argv).command_line()
        except InvocationError:
            return None
