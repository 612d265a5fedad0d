"""A fake Vertex AI Pipelines API on 127.0.0.1 that holds requests to Google's own description.

Every request body is validated against the aiplatform v1 discovery document that
google-api-python-client ships (a test dependency): unknown fields and wrong JSON types get
400 INVALID_ARGUMENT, as Google answers. Requests must carry an access token that the fake
Google token endpoint issued. The fake advances a job's state on each read (PENDING, RUNNING,
then SUCCEEDED, or FAILED when a named task is set to fail), pages its lists, and answers 429
or 503 at a configurable rate.
"""

from __future__ import annotations

import json
import random
import re
import threading
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

_DOCS: dict[str, dict[str, Any]] = {}


def discovery(api: str = "aiplatform.v1") -> dict[str, Any]:
    """Google's published description of ``api`` (as google-api-python-client ships it)."""
    if api not in _DOCS:
        import googleapiclient

        path = Path(googleapiclient.__file__).parent / "discovery_cache" / "documents" / f"{api}.json"
        _DOCS[api] = json.loads(path.read_text())
    return _DOCS[api]


class FailedPrecondition(Exception):
    """A request the resource's state refuses (400 FAILED_PRECONDITION)."""


class Invalid(Exception):
    pass


def validate(value: Any, schema: dict[str, Any], where: str, api: str = "aiplatform.v1") -> None:
    """Check ``value`` against a discovery schema the way Google's JSON parser does."""
    if "$ref" in schema:
        schema = discovery(api)["schemas"][schema["$ref"]]
    kind = schema.get("type")
    if kind == "object":
        if not isinstance(value, dict):
            raise Invalid(f"Invalid value at '{where}', expected an object")
        properties = schema.get("properties")
        if properties is not None:
            for key, item in value.items():
                if key not in properties:
                    raise Invalid(f'Invalid JSON payload received. Unknown name "{key}" at \'{where}\': '
                                  "Cannot find field.")
                validate(item, properties[key], f"{where}.{key}" if where else key, api)
        elif "additionalProperties" in schema:
            for key, item in value.items():
                validate(item, schema["additionalProperties"], f"{where}[{key}]", api)
        return
    if kind == "array":
        if not isinstance(value, list):
            raise Invalid(f"Invalid value at '{where}', expected a list")
        for index, item in enumerate(value):
            validate(item, schema.get("items", {}), f"{where}[{index}]", api)
        return
    if kind == "string":
        if schema.get("format") in {"int64", "uint64"}:
            if isinstance(value, bool) or not isinstance(value, (str, int)) or not re.fullmatch(r"-?\d+", str(value)):
                raise Invalid(f"Invalid value at '{where}' (TYPE_INT64), {json.dumps(value)}")
            return
        if not isinstance(value, str):
            raise Invalid(f"Invalid value at '{where}' (TYPE_STRING), {json.dumps(value)}")
        if "enum" in schema and value not in schema["enum"]:
            raise Invalid(f"Invalid value at '{where}', {json.dumps(value)}")
        return
    if kind == "boolean" and not isinstance(value, bool):
        raise Invalid(f"Invalid value at '{where}' (TYPE_BOOL), {json.dumps(value)}")
    if kind == "integer" and (isinstance(value, bool) or not isinstance(value, int)):
        raise Invalid(f"Invalid value at '{where}' (TYPE_INT32), {json.dumps(value)}")
    if kind == "number" and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise Invalid(f"Invalid value at '{where}' (TYPE_DOUBLE), {json.dumps(value)}")
    # "any" (pipelineSpec is a Struct): anything goes


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _spec_tasks(spec: dict[str, Any]) -> list[str]:
    tasks = list(spec.get("root", {}).get("dag", {}).get("tasks", {}))
    for component in spec.get("components", {}).values():
        tasks += list(component.get("dag", {}).get("tasks", {}))
    return [t for t in tasks if not spec.get("components", {}).get(f"comp-{t}", {}).get("dag")]


class FakeVertex:
    def __init__(self, google: Any, *, project: str = "kvx-test", region: str = "europe-west1",
                 fault_rate: float = 0.0, seed: int = 0, page_size: int = 2) -> None:
        self.google = google
        self.project = project
        self.region = region
        self.parent = f"projects/{project}/locations/{region}"
        self.fault_rate = fault_rate
        self.rng = random.Random(seed)
        self.page_size = page_size
        self.jobs: dict[str, dict[str, Any]] = {}
        self.templates: dict[tuple[str, str], dict[str, Any]] = {}  # (package, tag or version) -> spec
        self.schedules: dict[str, dict[str, Any]] = {}
        self.fail_tasks: set[str] = set()
        #: Running jobs become PAUSED (and stay so), as an operator's pause leaves them.
        self.pause_jobs = False
        self.requests: list[tuple[str, str]] = []
        self.faults = 0
        #: Create the next job but drop the connection instead of answering (a lost answer).
        self.lose_next_job_answer = False
        #: Create the next schedule but drop the connection instead of answering.
        self.lose_next_schedule_answer = False
        self._schedule_ids = 0
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *_: Any) -> None:
                pass

            def _handle(self) -> None:
                fake._serve(self)

            do_GET = do_POST = do_PATCH = do_DELETE = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def start(self) -> FakeVertex:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    # --- transport ------------------------------------------------------------------------

    def _serve(self, handler: BaseHTTPRequestHandler) -> None:
        length = int(handler.headers.get("Content-Length") or 0)
        raw = handler.rfile.read(length) if length else b""
        url = urlparse(handler.path)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        with self.lock:
            self.requests.append((handler.command, url.path))
            fault = self.fault_rate and self.rng.random() < self.fault_rate
            if fault:
                self.faults += 1
        if fault:
            code = self.rng.choice([429, 503])
            self._send(handler, code, {"error": {"code": code, "message": "injected",
                                                 "status": "RESOURCE_EXHAUSTED" if code == 429 else "UNAVAILABLE"}})
            return
        token = handler.headers.get("Authorization", "").removeprefix("Bearer ")
        if not token or token not in self.google.issued:
            self._send(handler, 401, {"error": {"code": 401, "message": "Request had invalid authentication "
                                                "credentials.", "status": "UNAUTHENTICATED"}})
            return
        try:
            if url.path.startswith("/kfp/"):
                status, payload = self._upload(handler.headers.get("Content-Type", ""), raw)
                self._send(handler, status, payload)
                return
            body = json.loads(raw) if raw else {}
            if url.path == "/v2/entries:list":
                status, payload = self._log_entries(body)
            else:
                status, payload = self._route(handler.command, url.path.removeprefix("/v1/"), query, body)
                if status == 200 and handler.command == "POST" and url.path.endswith(("/pipelineJobs", "/schedules")):
                    with self.lock:
                        if url.path.endswith("/pipelineJobs"):
                            lose, self.lose_next_job_answer = self.lose_next_job_answer, False
                        else:
                            lose, self.lose_next_schedule_answer = self.lose_next_schedule_answer, False
                    if lose:  # the job exists; its creator never hears
                        handler.close_connection = True
                        handler.connection.shutdown(2)
                        return
        except Invalid as exc:
            status, payload = 400, {"error": {"code": 400, "message": str(exc), "status": "INVALID_ARGUMENT"}}
        except FailedPrecondition as exc:
            status, payload = 400, {"error": {"code": 400, "message": str(exc), "status": "FAILED_PRECONDITION"}}
        except json.JSONDecodeError:
            status, payload = 400, {"error": {"code": 400, "message": "Invalid JSON payload",
                                              "status": "INVALID_ARGUMENT"}}
        self._send(handler, status, payload)

    def _send(self, handler: BaseHTTPRequestHandler, status: int, payload: Any) -> None:
        data = json.dumps(payload).encode()
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)

    @staticmethod
    def _not_found(name: str) -> tuple[int, dict[str, Any]]:
        return 404, {"error": {"code": 404, "message": f"{name} not found", "status": "NOT_FOUND"}}

    def _method(self, resource: str, method: str) -> dict[str, Any]:
        return discovery()["resources"]["projects"]["resources"]["locations"]["resources"][resource]["methods"][method]

    def _validate(self, resource: str, method: str, body: Any) -> None:
        request = self._method(resource, method).get("request")
        if request:
            validate(body, request, "")

    # --- API --------------------------------------------------------------------------------

    def _route(self, method: str, path: str, query: dict[str, str], body: Any) -> tuple[int, Any]:
        jobs, schedules = f"{self.parent}/pipelineJobs", f"{self.parent}/schedules"
        with self.lock:
            if path == jobs and method == "POST":
                self._validate("pipelineJobs", "create", body)
                return self._create_job(body, query.get("pipelineJobId"))
            if path == jobs and method == "GET":
                return 200, self._page([self._advance(j) for j in self._filtered(self.jobs.values(), query)],
                                       query, "pipelineJobs")
            if path.startswith(jobs + "/") and path.endswith(":cancel") and method == "POST":
                self._validate("pipelineJobs", "cancel", body)
                job = self.jobs.get(path.removesuffix(":cancel"))
                if job is None:
                    return self._not_found(path)
                job["state"] = "PIPELINE_STATE_CANCELLING"
                return 200, {}
            if path.startswith(jobs + "/") and method == "GET":
                job = self.jobs.get(path)
                return (200, self._advance(job)) if job else self._not_found(path)
            if path == schedules and method == "POST":
                self._validate("schedules", "create", body)
                self._schedule_ids += 1
                name = f"{schedules}/{self._schedule_ids}"
                created = _now()
                # startTime: "Default to Schedule create time if not specified".
                self.schedules[name] = {"startTime": created, **body, "name": name, "state": "ACTIVE",
                                        "createTime": created}
                return 200, self.schedules[name]
            if path == schedules and method == "GET":
                found = list(self.schedules.values())
                match = re.fullmatch(r'display_name="([^"]*)"', query.get("filter", ""))
                if match:
                    found = [s for s in found if s["displayName"] == match.group(1)]
                return 200, self._page(found, query, "schedules")
            if path.startswith(schedules + "/"):
                return self._schedule(method, path, query, body)
        return self._not_found(path)

    def _upload(self, content_type: str, raw: bytes) -> tuple[int, Any]:
        """Artifact Registry's KFP upload: multipart form with ``content`` and ``tags``."""
        import email.parser
        import hashlib

        import yaml

        message = email.parser.BytesParser().parsebytes(
            f"Content-Type: {content_type}\r\n\r\n".encode() + raw)
        fields = {part.get_param("name", header="content-disposition"): part.get_payload(decode=True)
                  for part in message.get_payload()} if message.is_multipart() else {}
        if not fields.get("content"):
            raise Invalid("no pipeline template in the upload")
        spec = yaml.safe_load(fields["content"])
        package = spec["pipelineInfo"]["name"]
        version = "sha256:" + hashlib.sha256(fields["content"]).hexdigest()
        with self.lock:
            for tag in [version, *(fields.get("tags") or b"").decode().split(",")]:
                if tag:
                    self.templates[(package, tag)] = spec
        return 200, {"packageName": package, "versionName": version}

    def _log_entries(self, body: dict[str, Any]) -> tuple[int, Any]:
        validate(body, {"$ref": "ListLogEntriesRequest"}, "", "logging.v2")
        match = re.search(r'resource\.labels\.job_id="(\d+)"', body.get("filter", ""))
        entries = []
        with self.lock:
            for job in self.jobs.values():
                for detail in (job.get("jobDetail") or {}).get("taskDetails", []):
                    main = (detail.get("executorDetail") or {}).get("containerDetail", {}).get("mainJob", "")
                    if match and main.endswith("/" + match.group(1)):
                        entries.append({"timestamp": _now(), "severity": "ERROR", "jsonPayload": {
                            "message": f"exec-node failed: node '{detail['taskName']}' raised ValueError: "
                                       "injected failure"}})
        return 200, {"entries": entries}

    def _create_job(self, body: dict[str, Any], job_id: str | None) -> tuple[int, Any]:
        if not job_id or not re.fullmatch(r"[a-z][-a-z0-9]{0,127}", job_id):
            raise Invalid(f"Invalid pipelineJobId {job_id!r}")
        name = f"{self.parent}/pipelineJobs/{job_id}"
        if name in self.jobs:
            return 409, {"error": {"code": 409, "message": f"{name} already exists", "status": "ALREADY_EXISTS"}}
        if "templateUri" in body:
            package, tag = body["templateUri"].rstrip("/").split("/")[-2:]
            spec = self.templates.get((package, tag))
            if spec is None:
                return 404, {"error": {"code": 404, "message": f"template {body['templateUri']} not found",
                                       "status": "NOT_FOUND"}}
            body = {**body, "pipelineSpec": spec}
        job = {**body, "name": name, "state": "PIPELINE_STATE_PENDING", "createTime": _now(), "polls": 0}
        self.jobs[name] = job
        return 200, self._public(job)

    def _advance(self, job: dict[str, Any]) -> dict[str, Any]:
        """Each read moves a job on: PENDING -> RUNNING (tasks running) -> its end."""
        job["polls"] += 1
        tasks = _spec_tasks(job.get("pipelineSpec", {}))
        state = job["state"]
        if state == "PIPELINE_STATE_CANCELLING":
            job["state"] = "PIPELINE_STATE_CANCELLED"
            job["endTime"] = _now()
        elif state == "PIPELINE_STATE_PENDING" and job["polls"] >= 1:
            job["state"] = "PIPELINE_STATE_RUNNING"
            job["startTime"] = _now()
            job["jobDetail"] = {"taskDetails": [{"taskId": str(i), "taskName": t, "state": "RUNNING",
                                                 "startTime": _now()} for i, t in enumerate(tasks)]}
        elif state == "PIPELINE_STATE_RUNNING" and self.pause_jobs:
            job["state"] = "PIPELINE_STATE_PAUSED"
        elif state == "PIPELINE_STATE_RUNNING" and job["polls"] >= 3:
            failed = False
            for detail in job["jobDetail"]["taskDetails"]:
                detail["endTime"] = _now()
                if detail["taskName"] in self.fail_tasks:
                    failed = True
                    detail["state"] = "FAILED"
                    detail["error"] = {"code": 9, "message": f"The replica workerpool0-0 exited with a non-zero "
                                                              f"status of 1. Task {detail['taskName']} failed."}
                    detail["executorDetail"] = {"containerDetail": {
                        "mainJob": f"{self.parent}/customJobs/{abs(hash(detail['taskName'])) % 10**12}"}}
                else:
                    detail["state"] = "SUCCEEDED"
            job["state"] = "PIPELINE_STATE_FAILED" if failed else "PIPELINE_STATE_SUCCEEDED"
            job["endTime"] = _now()
            if failed:
                job["error"] = {"code": 9, "message": "The DAG failed because some tasks failed."}
        return self._public(job)

    @staticmethod
    def _public(job: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in job.items() if k != "polls"}

    @staticmethod
    def _filtered(jobs: Any, query: dict[str, str]) -> list[dict[str, Any]]:
        found = sorted(jobs, key=lambda j: j["createTime"], reverse=True)
        match = re.fullmatch(r'labels\.([\w-]+)="([^"]*)"', query.get("filter", ""))
        if match:
            found = [j for j in found if j.get("labels", {}).get(match.group(1)) == match.group(2)]
        return found

    def _page(self, items: list[Any], query: dict[str, str], key: str) -> dict[str, Any]:
        size = min(int(query.get("pageSize") or 100), self.page_size)
        start = int(query.get("pageToken") or 0)
        page = {key: items[start:start + size]}
        if start + size < len(items):
            page["nextPageToken"] = str(start + size)
        return page

    def _schedule(self, method: str, path: str, query: dict[str, str], body: Any) -> tuple[int, Any]:
        name, _, action = path.partition(":")
        schedule = self.schedules.get(name)
        if schedule is None:
            return self._not_found(name)
        if method == "GET":
            return 200, schedule
        if method == "DELETE":
            del self.schedules[name]
            return 200, {}
        if method == "PATCH":
            self._validate("schedules", "patch", body)
            mask = [field for field in query.get("updateMask", "").split(",") if field]
            if not mask:
                raise Invalid("updateMask is required")
            if schedule["state"] not in ("ACTIVE", "PAUSED"):  # "Updates an active or paused Schedule"
                raise FailedPrecondition(f"Schedule {name} is {schedule['state']}: only an active or paused "
                                         "Schedule can be updated")
            # UpdateScheduleRequest: "The non-empty fields cannot be unset".
            unset = [field for field in mask if field not in body and schedule.get(field) not in (None, "")]
            if unset:
                raise Invalid(f"The non-empty fields cannot be unset: {', '.join(unset)}")
            for field in mask:
                if field in body:
                    schedule[field] = body[field]
                else:
                    schedule.pop(field, None)
            schedule["updateTime"] = _now()
            return 200, schedule
        if method == "POST" and action in {"pause", "resume"}:
            self._validate("schedules", action, body)
            if schedule["state"] != ("ACTIVE" if action == "pause" else "PAUSED"):
                raise FailedPrecondition(f"Only {'an active' if action == 'pause' else 'a paused'} Schedule "
                                         f"can be {action}d; {name} is {schedule['state']}")
            schedule["state"] = "PAUSED" if action == "pause" else "ACTIVE"
            return 200, {}
        return self._not_found(path)
