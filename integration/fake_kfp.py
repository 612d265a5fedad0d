"""A fake Kubeflow Pipelines API (``/apis/v2beta1``) on 127.0.0.1, strict where KFP is.

- Every request body is checked against the published ``kfp-server-api`` models (test
  dependency): each key must be a field of the model (recursively, as the API server rejects
  unknown fields) and the body must deserialize into the model; a violation is a 400 naming
  the key, and is recorded in ``problems`` for the test to assert on.
- Auth, per mode: ``bearer`` (a fixed token), ``iap`` (an ID token from
  :class:`~integration.fakes.FakeGoogle` for the expected audience), ``dex`` (the login flow of
  Dex + oidc-authservice: redirects to a password form, then the ``authservice_session``
  cookie). Anything else is a 401.
- Runs advance one state per GET (PENDING, RUNNING, then SUCCEEDED or FAILED), with a task per
  DAG task of the submitted spec; tasks named in ``fail_tasks`` fail.
- List answers use KFP's keys: snake_case, except ``recurringRuns`` (as the API sends it).
"""

from __future__ import annotations

import json
import secrets
import threading
import uuid
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

from integration.fakes import verify_jwt

BEARER_TOKEN = "kfp-test-bearer-token-5d1c"
DEX_USER, DEX_PASSWORD = "ci@example.com", "dex-Passw0rd-for-tests"
_COOKIE = "authservice_session"
#: oauth2-proxy's cookie (Kubeflow >= 1.9); one over 4 KB is split into _0, _1...
_PROXY_COOKIE = "oauth2_proxy_kubeflow"
_COOKIE_LIMIT = 4000


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


#: The fields of kfp-kubernetes' ``KubernetesExecutorConfig.secret_as_env`` entries
#: (kubernetes_executor_config.proto: SecretAsEnv and its SecretKeyToEnvMap), proto3 JSON names.
_SECRET_AS_ENV_FIELDS = {"secretName", "secretNameParameter", "keyToEnv", "optional"}
_KEY_TO_ENV_FIELDS = {"secretKey", "envVar"}
#: The fields of kfp-kubernetes' ``KubernetesExecutorConfig`` (proto3 JSON names) and of its
#: ``NodeSelector``.
_EXECUTOR_CONFIG_FIELDS = {
    "secretAsVolume", "secretAsEnv", "pvcMount", "nodeSelector", "podMetadata", "imagePullSecret",
    "imagePullPolicy", "configMapAsVolume", "configMapAsEnv", "activeDeadlineSeconds", "fieldPathAsEnv",
    "tolerations", "genericEphemeralVolume", "nodeAffinity", "podAffinity", "enabledSharedMemory", "emptyDirMounts",
}
_NODE_SELECTOR_FIELDS = {"labels", "nodeSelectorJson"}
#: Resource names a container may ask for without a domain; any other must be an extended
#: resource with one (nvidia.com/gpu), or Kubernetes refuses the pod.
_STANDARD_RESOURCES = {"cpu", "memory", "ephemeral-storage"}


def split_pipeline_spec(value: Any) -> tuple[dict, dict | None]:
    """A run's ``pipeline_spec``: the spec alone, or ``{"pipeline_spec", "platform_spec"}`` (as
    the kfp SDK's client sends a spec with a platform spec)."""
    if isinstance(value, dict) and set(value) == {"pipeline_spec", "platform_spec"}:
        return value["pipeline_spec"], value["platform_spec"]
    return value, None


def check_platform_spec(spec: dict, platform: dict | None) -> list[str]:
    """A Kubernetes platform spec as KFP reads it: kfp-pipeline-spec's ``PlatformSpec``, one
    executor config per executor of the spec."""
    if platform is None:
        return []
    from google.protobuf import json_format
    from kfp.pipeline_spec import pipeline_spec_pb2

    try:
        json_format.ParseDict(platform, pipeline_spec_pb2.PlatformSpec())
    except json_format.ParseError as exc:
        return [f"platform_spec: {exc}"]
    problems = []
    known = set(spec.get("deploymentSpec", {}).get("executors", {}))
    executors = platform.get("platforms", {}).get("kubernetes", {}).get("deploymentSpec", {}).get("executors", {})
    for label, config in executors.items():
        if label not in known:
            problems.append(f"platform_spec: executor {label} is not in the pipeline spec")
        problems += [f"platform_spec: {label}.{key}: not a field of KubernetesExecutorConfig" for key in config
                     if key not in _EXECUTOR_CONFIG_FIELDS]
        selector = config.get("nodeSelector", {})
        problems += [f"platform_spec: {label}.nodeSelector.{key}: unknown field" for key in selector
                     if key not in _NODE_SELECTOR_FIELDS]
        labels = selector.get("labels", {})
        if not isinstance(labels, dict) or not all(isinstance(v, str) for v in labels.values()):
            problems.append(f"platform_spec: {label}.nodeSelector.labels: not a map of strings")
        for entry in config.get("secretAsEnv", []):
            problems += [f"platform_spec: {label}.secretAsEnv.{key}: unknown field" for key in entry
                         if key not in _SECRET_AS_ENV_FIELDS]
            problems += [f"platform_spec: {label}.secretAsEnv.keyToEnv.{key}: unknown field"
                         for pair in entry.get("keyToEnv", []) for key in pair if key not in _KEY_TO_ENV_FIELDS]
            if not entry.get("secretName") and not entry.get("secretNameParameter"):
                problems.append(f"platform_spec: {label}.secretAsEnv: no secret name")
    return problems


def check_accelerators(spec: dict) -> list[str]:
    """Accelerators as KFP's driver reads them: ``resourceType`` (``type`` in releases before it)
    is the Kubernetes resource name it puts in the pod's limits, ``resourceCount`` the count."""
    problems = []
    for label, executor in spec.get("deploymentSpec", {}).get("executors", {}).items():
        accelerator = executor.get("container", {}).get("resources", {}).get("accelerator")
        if not accelerator:
            continue
        for key in ("resourceType", "type"):
            name = accelerator.get(key)
            if name and "/" not in name and name not in _STANDARD_RESOURCES:
                problems.append(f"pipeline_spec: {label}.resources.accelerator.{key}: {name!r} is not a "
                                "Kubernetes resource name (e.g. nvidia.com/gpu): the pod would be refused")
        count = accelerator.get("resourceCount", accelerator.get("count"))
        if count is not None and not str(count).isdigit():
            problems.append(f"pipeline_spec: {label}.resources.accelerator: count {count!r} is not a number")
    return problems


def check_model(data: Any, model: str, where: str = "") -> list[str]:
    """Keys of ``data`` that are not fields of kfp-server-api's ``model`` (recursively)."""
    import kfp_server_api

    cls = getattr(kfp_server_api.models, model)
    fields = {json_key: attribute for attribute, json_key in cls.attribute_map.items()}
    problems = []
    if not isinstance(data, dict):
        return [f"{where or model}: expected an object"]
    for key, value in data.items():
        if key not in fields:
            problems.append(f"{where}{key}: not a field of {model}")
            continue
        kind = cls.openapi_types[fields[key]]
        if hasattr(kfp_server_api.models, kind) and getattr(kfp_server_api.models, kind).attribute_map:
            problems += check_model(value, kind, f"{where}{key}.")
    if not problems:
        try:
            kfp_server_api.ApiClient()._ApiClient__deserialize(data, model)
        except Exception as exc:  # a value of the wrong type, an unknown enum value
            problems.append(f"{where or model}: does not deserialize: {exc}")
    return problems


class FakeKfp:
    def __init__(self, auth: str = "bearer", audience: str | None = None) -> None:
        self.auth = auth
        self.audience = audience
        self.lock = threading.Lock()
        self.experiments: dict[str, dict] = {}
        self.runs: dict[str, dict] = {}
        self.recurring: dict[str, dict] = {}
        self.pipelines: dict[str, dict] = {}
        self.versions: dict[str, list[dict]] = {}
        self.problems: list[str] = []
        self.requests: list[tuple[str, str]] = []
        self.fail_tasks: set[str] = set()
        #: As KFP before 2.4 (kubeflow/pipelines#11405): a run whose exit handler succeeded is
        #: SUCCEEDED, though a task inside it failed.
        self.exit_handler_masks_failures = False
        self.sessions: set[str] = set()
        self.logins = 0
        #: Credentials seen so far that are refused from now on (a revoked token, an ended session).
        self.revoked: set[str] = set()
        self.revoke_after_first_use = False
        #: Routes ("runs", "experiments", "recurringruns", "pipelines/upload", "pipelines/upload_version")
        #: whose next create is made but never answered: the connection drops, as when an answer is
        #: lost on the way.
        self.lose_next_answer_to: set[str] = set()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.httpd.fake = self  # type: ignore[attr-defined]
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/pipeline"

    def start(self) -> FakeKfp:
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    # --- auth -------------------------------------------------------------------------------

    def authorized(self, headers: Any) -> bool:
        credential = headers.get("Authorization", "") + headers.get("Cookie", "")
        if credential in self.revoked:
            return False
        accepted = self._accepted(headers)
        if accepted and self.revoke_after_first_use:
            self.revoked.add(credential)
            self.revoke_after_first_use = False
        return accepted

    def _accepted(self, headers: Any) -> bool:
        header = headers.get("Authorization", "")
        if self.auth == "bearer":
            return header == f"Bearer {BEARER_TOKEN}"
        if self.auth == "iap":
            claims = verify_jwt(header.removeprefix("Bearer ")) if header.startswith("Bearer ") else None
            return bool(claims and claims.get("aud") == self.audience)
        cookies = dict(part.strip().split("=", 1) for part in headers.get("Cookie", "").split(";") if "=" in part)
        if self.auth == "dex":
            return cookies.get(_COOKIE) in self.sessions
        if self.auth == "oauth2-proxy":
            parts = [cookies.get(f"{_PROXY_COOKIE}_{i}") for i in range(len(cookies))]
            joined = "".join(part for part in parts if part is not None)
            return (joined or cookies.get(_PROXY_COOKIE)) in self.sessions
        return True

    # --- runs advance as they are watched ---------------------------------------------------

    def advance(self, run: dict) -> None:
        state = run["state"]
        if state in {"SUCCEEDED", "FAILED", "CANCELED"}:
            return
        if state == "PENDING":
            run["state"] = "RUNNING"
            for task in run["run_details"]["task_details"]:
                task.update(state="RUNNING", start_time=_now())
            return
        failed = False
        for task in run["run_details"]["task_details"]:
            if task["display_name"] in self.fail_tasks:
                failed = True
                task.update(state="FAILED", end_time=_now(),
                            error={"code": 2, "message": "exit status 1: node raised ValueError"})
            else:
                task.update(state="SUCCEEDED", end_time=_now())
        masked = failed and self.exit_handler_masks_failures
        run.update(state="FAILED" if failed and not masked else "SUCCEEDED", finished_at=_now())


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *_: Any) -> None:
        pass

    @property
    def fake(self) -> FakeKfp:
        return self.server.fake  # type: ignore[attr-defined]

    def _created(self, route: str, resource: Any) -> None:
        if route in self.fake.lose_next_answer_to:  # it exists; its creator never hears
            self.fake.lose_next_answer_to.discard(route)
            self.close_connection = True
            self.connection.shutdown(2)
            return
        self._send(200, resource)

    def _send(self, status: int, body: Any = None, headers: dict[str, str | list[str]] | None = None,
              content_type: str = "application/json") -> None:
        data = body.encode() if isinstance(body, str) else json.dumps(body if body is not None else {}).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            for one in value if isinstance(value, list) else [value]:
                self.send_header(name, one)
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, message: str) -> None:
        self._send(status, {"error": message, "code": status, "message": message})

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _json(self, model: str) -> dict | None:
        try:
            body = json.loads(self._body() or b"{}")
        except ValueError:
            self._error(400, "body is not JSON")
            return None
        problems = check_model(body, model)
        if problems:
            self.fake.problems += problems
            self._error(400, "; ".join(problems))
            return None
        return body

    # --- Dex login (oidc-authservice in front, as on Kubeflow <= 1.8) -----------------------

    def _dex(self, method: str, url: Any) -> bool:
        path = url.path
        if path == "/dex/auth":
            self._send(302, "", {"Location": "/dex/auth/local?req=r1"}, "text/html")
        elif path == "/dex/auth/local" and method == "GET":
            form = ('<html><form method="post" action="/dex/auth/local/login?back=&amp;state=r1">'
                    '<input type="hidden" name="_csrf" value="csrf-1"/>'
                    '<input name="login"/><input name="password" type="password"/></form></html>')
            self._send(200, form, content_type="text/html")
        elif path == "/dex/auth/local/login" and method == "POST":
            fields = parse_qs(self._body().decode())
            ok = (fields.get("login") == [DEX_USER] and fields.get("password") == [DEX_PASSWORD]
                  and fields.get("_csrf") == ["csrf-1"])
            if not ok:
                self._send(200, "<html>Invalid Email Address and password</html>", content_type="text/html")
            else:
                callback = "/oauth2/callback" if self.fake.auth == "oauth2-proxy" else "/authservice/oidc/callback"
                self._send(303, "", {"Location": f"{callback}?code=c1&state=r1"}, "text/html")
        elif path == "/oauth2/start":  # oauth2-proxy sends the login to Dex
            self._send(302, "", {"Location": "/dex/auth?client_id=kubeflow-oidc-authservice&state=r1"}, "text/html")
        elif path == "/authservice/oidc/callback":
            session = uuid.uuid4().hex
            with self.fake.lock:
                self.fake.sessions.add(session)
                self.fake.logins += 1
            self._send(302, "", {"Location": "/pipeline", "Set-Cookie": f"{_COOKIE}={session}; Path=/"}, "text/html")
        elif path == "/oauth2/callback":
            # A session cookie holding Dex's tokens is larger than a browser keeps in one cookie.
            session = secrets.token_hex(2600)
            with self.fake.lock:
                self.fake.sessions.add(session)
                self.fake.logins += 1
            chunks = [session[i:i + _COOKIE_LIMIT] for i in range(0, len(session), _COOKIE_LIMIT)]
            cookies = [f"{_PROXY_COOKIE}_{i}={chunk}; Path=/; HttpOnly" for i, chunk in enumerate(chunks)]
            self._send(302, "", {"Location": "/pipeline", "Set-Cookie": cookies}, "text/html")
        else:
            return False
        return True

    # --- the API ------------------------------------------------------------------------------

    def _handle(self) -> None:
        url = urlparse(self.path)
        method = self.command
        self.fake.requests.append((method, url.path))
        if self.fake.auth in {"dex", "oauth2-proxy"} and self._dex(method, url):
            return
        if not self.fake.authorized(self.headers):
            if self.fake.auth == "dex":  # the auth proxy sends anything without a session to log in
                self._send(302, "", {"Location": "/dex/auth?client_id=kubeflow-oidc-authservice&state=r1"},
                           "text/html")
                return
            self._error(401, "Unauthenticated")  # oauth2-proxy too: an API client is not redirected
            return
        prefix = "/pipeline/apis/v2beta1/"
        if not url.path.startswith(prefix):
            self._send(200, "<html>Kubeflow Pipelines</html>", content_type="text/html")
            return
        route = url.path[len(prefix):]
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        with self.fake.lock:
            self._route(method, route, query)

    do_GET = do_POST = do_DELETE = _handle

    def _route(self, method: str, route: str, query: dict[str, str]) -> None:
        fake = self.fake
        parts = route.split("/")
        if route == "experiments" and method == "GET":
            wanted = _filter_value(query)
            found = [e for e in fake.experiments.values() if wanted is None or e["display_name"] == wanted]
            self._send(200, {"experiments": found, "total_size": len(found)})
        elif route == "experiments" and method == "POST":
            body = self._json("V2beta1Experiment")
            if body is not None:
                if any(e["display_name"] == body.get("display_name") for e in fake.experiments.values()):
                    self._error(409, f"Failed to create a new experiment. The name {body.get('display_name')} "
                                "already exists. Please specify a new name")
                    return
                experiment = {**body, "experiment_id": uuid.uuid4().hex, "created_at": _now()}
                fake.experiments[experiment["experiment_id"]] = experiment
                self._created("experiments", experiment)
        elif route == "runs" and method == "POST":
            body = self._json("V2beta1Run")
            if body is None or not self._platform_checked(body):
                return
            if body.get("experiment_id") not in fake.experiments:
                self._error(400, "experiment not found")
                return
            tasks = [{"display_name": name, "task_id": uuid.uuid4().hex, "state": "PENDING",
                      "child_tasks": [{"pod_name": f"{name}-pod"}]}
                     for name in split_pipeline_spec(body["pipeline_spec"])[0]["root"]["dag"]["tasks"]]
            run = {**body, "run_id": str(uuid.uuid4()), "state": "PENDING", "created_at": _now(),
                   "scheduled_at": _now(), "finished_at": "1970-01-01T00:00:00Z",
                   "run_details": {"task_details": tasks}}
            fake.runs[run["run_id"]] = run
            self._created("runs", run)
        elif route == "runs" and method == "GET":
            wanted = _filter_value(query)
            runs = [r for r in fake.runs.values() if r.get("experiment_id") == query.get("experiment_id")
                    and (wanted is None or r["display_name"] == wanted)]
            runs.sort(key=lambda r: r["created_at"], reverse=True)
            self._send(200, {"runs": runs, "total_size": len(runs)})
        elif parts[0] == "runs" and len(parts) == 2 and method == "GET":
            run = fake.runs.get(parts[1])
            if run is None:
                self._error(404, f"run {parts[1]} not found")
                return
            fake.advance(run)
            self._send(200, run)
        elif parts[0] == "runs" and len(parts) == 2 and parts[1].endswith(":terminate") and method == "POST":
            run = fake.runs.get(parts[1].removesuffix(":terminate"))
            if run is None:
                self._error(404, "run not found")
                return
            run["state"] = "CANCELED"
            self._send(200, {})
        elif route == "recurringruns" and method == "POST":
            body = self._json("V2beta1RecurringRun")
            if body is not None and self._platform_checked(body):
                recurring = {**body, "recurring_run_id": uuid.uuid4().hex, "created_at": _now(),
                             "status": "DISABLED" if body.get("mode") == "DISABLE" else "ENABLED"}
                fake.recurring[recurring["recurring_run_id"]] = recurring
                self._created("recurringruns", recurring)
        elif route == "recurringruns" and method == "GET":
            wanted = _filter_value(query)
            found = [r for r in fake.recurring.values() if wanted is None or r["display_name"] == wanted]
            self._send(200, {"recurringRuns": found, "total_size": len(found)})
        elif parts[0] == "recurringruns" and len(parts) == 2:
            key, _, verb = parts[1].partition(":")
            recurring = fake.recurring.get(key)
            if recurring is None:
                self._error(404, "recurring run not found")
            elif method == "DELETE":
                del fake.recurring[key]
                self._send(200, {})
            elif method == "POST" and verb in {"enable", "disable"}:
                recurring["status"] = "ENABLED" if verb == "enable" else "DISABLED"
                self._send(200, {})
            else:
                self._send(200, recurring)
        elif parts[:2] == ["pipelines", "names"] and method == "GET":
            pipeline = next((p for p in fake.pipelines.values() if p["display_name"] == parts[2]), None)
            if pipeline is None:
                self._error(404, f"pipeline {parts[2]} not found")
            else:
                self._send(200, pipeline)
        elif route in {"pipelines/upload", "pipelines/upload_version"} and method == "POST":
            spec = self._upload()
            if spec is None:
                return
            if route == "pipelines/upload":
                if any(p["display_name"] == query["name"] for p in fake.pipelines.values()):
                    # KFP's words (the pipeline store's unique name per namespace)
                    self._error(409, f"Failed to create a pipeline due to conflict: pipeline {query['name']} "
                                     "already exists")
                    return
                pipeline = {"pipeline_id": uuid.uuid4().hex, "display_name": query["name"], "created_at": _now()}
                fake.pipelines[pipeline["pipeline_id"]] = pipeline
                pipeline_id, name = pipeline["pipeline_id"], query["name"]
            else:
                pipeline_id, name = query["pipelineid"], query["name"]
                if pipeline_id not in fake.pipelines:
                    self._error(404, "pipeline not found")
                    return
                if any(v["display_name"] == name for v in fake.versions.get(pipeline_id, [])):
                    self._error(409, f"version {name} exists")
                    return
            version = {"pipeline_id": pipeline_id, "pipeline_version_id": uuid.uuid4().hex, "display_name": name,
                       "created_at": _now(), "pipeline_spec": spec}
            fake.versions.setdefault(pipeline_id, []).append(version)
            self._created(route, fake.pipelines[pipeline_id] if route == "pipelines/upload" else version)
        elif parts[0] == "pipelines" and len(parts) == 3 and parts[2] == "versions" and method == "GET":
            versions = sorted(fake.versions.get(parts[1], []), key=lambda v: v["created_at"], reverse=True)
            self._send(200, {"pipeline_versions": versions, "total_size": len(versions)})
        else:
            self._error(404, f"no route {method} {route}")

    def _platform_checked(self, body: dict) -> bool:
        spec, platform = split_pipeline_spec(body.get("pipeline_spec"))
        problems = check_accelerators(spec) + check_platform_spec(spec, platform)
        if problems:
            self.fake.problems += problems
            self._error(400, "; ".join(problems))
        return not problems

    def _upload(self) -> dict | None:
        """The ``uploadfile`` part of a multipart upload, parsed as a pipeline spec."""
        import email
        import email.policy

        import yaml

        head = f"Content-Type: {self.headers.get('Content-Type', '')}\r\n\r\n".encode()
        message = email.message_from_bytes(head + self._body(), policy=email.policy.HTTP)
        parts = {part.get_param("name", header="content-disposition"): part.get_payload(decode=True)
                 for part in message.iter_parts()} if message.is_multipart() else {}
        if "uploadfile" not in parts:
            self._error(400, "no uploadfile part")
            return None
        # KFP's reading: the pipeline spec, then (optionally) platform spec documents
        documents = list(yaml.safe_load_all(parts["uploadfile"]))
        spec = documents[0] if documents else None
        if not isinstance(spec, dict) or "pipelineInfo" not in spec:
            self._error(400, "uploadfile is not a pipeline spec")
            return None
        platform: dict | None = None
        for document in documents[1:]:
            platform = {**(platform or {}), **document}
        stored = {"pipeline_spec": spec, "platform_spec": platform} if platform else spec
        if not self._platform_checked({"pipeline_spec": stored}):
            return None
        return stored


def _filter_value(query: dict[str, str]) -> str | None:
    """The value of an EQUALS predicate on display_name (as the API server parses filters)."""
    if "filter" not in query:
        return None
    predicates = json.loads(query["filter"])["predicates"]
    for predicate in predicates:
        assert set(predicate) <= {"operation", "key", "string_value", "stringValue"}, predicate
        assert predicate["operation"] in {"EQUALS", 1}, predicate
        if predicate["key"] == "display_name":
            return predicate.get("string_value") or predicate.get("stringValue")
    return None
