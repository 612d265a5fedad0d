"""The Airflow target's parts that need no Airflow: how credentials are chosen from the
environment, the host check, task states, run names and the DAGs folder (a real Airflow
drives the journey in integration/test_airflow_journey.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from kvx_runtime.auth.airflow import AirflowPasswordAuth, GoogleAccessTokenAuth, airflow_auth_from_environment
from kvx_runtime.auth.kfp import BearerTokenAuth, NoAuth
from kvx_runtime.config import load_plugin_config
from kvx_runtime.errors import ConfigError, UsageError
from kvx_runtime.targets.airflow import AirflowTarget, ApiV2, dag_spec
from kvx_runtime.targets.registry import TARGETS

HOST = "https://airflow.example.com"
AUTH_VARIABLES = ("KVX_AIRFLOW_TOKEN", "KVX_AIRFLOW_USERNAME", "KVX_AIRFLOW_PASSWORD", "KVX_AIRFLOW_AUTH")


@pytest.fixture(autouse=True)
def no_airflow_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in AUTH_VARIABLES:
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize(("variables", "host", "expected"), [
    ({}, HOST, NoAuth),
    ({"KVX_AIRFLOW_TOKEN": "t0k"}, HOST, BearerTokenAuth),
    ({"KVX_AIRFLOW_USERNAME": "admin", "KVX_AIRFLOW_PASSWORD": "pw"}, HOST, AirflowPasswordAuth),
    ({}, "https://abc123-dot-europe-west1.composer.googleusercontent.com", GoogleAccessTokenAuth),
    ({"KVX_AIRFLOW_AUTH": "google"}, HOST, GoogleAccessTokenAuth),
    # A token wins over a login, a forced mode over both.
    ({"KVX_AIRFLOW_TOKEN": "t0k", "KVX_AIRFLOW_USERNAME": "a", "KVX_AIRFLOW_PASSWORD": "b"}, HOST, BearerTokenAuth),
    ({"KVX_AIRFLOW_TOKEN": "t0k", "KVX_AIRFLOW_USERNAME": "a", "KVX_AIRFLOW_PASSWORD": "b",
      "KVX_AIRFLOW_AUTH": "password"}, HOST, AirflowPasswordAuth),
    ({"KVX_AIRFLOW_TOKEN": "t0k", "KVX_AIRFLOW_AUTH": "none"},
     "https://x.composer.googleusercontent.com", NoAuth),
])
def test_credentials_are_chosen_from_the_environment(monkeypatch: pytest.MonkeyPatch, variables: dict[str, str],
                                                     host: str, expected: type) -> None:
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    assert type(airflow_auth_from_environment(host)) is expected


@pytest.mark.parametrize(("variables", "message"), [
    ({"KVX_AIRFLOW_USERNAME": "admin"}, "needs both KVX_AIRFLOW_USERNAME and KVX_AIRFLOW_PASSWORD"),
    ({"KVX_AIRFLOW_TOKEN": "two words"}, "holds whitespace"),
    ({"KVX_AIRFLOW_AUTH": "kerberos"}, "'kerberos' is not one of token, password, google, none"),
    ({"KVX_AIRFLOW_AUTH": "token"}, "KVX_AIRFLOW_AUTH=token but KVX_AIRFLOW_TOKEN is not set"),
])
def test_incomplete_credentials_are_one_config_error_without_the_secret(monkeypatch: pytest.MonkeyPatch,
                                                                         variables: dict[str, str],
                                                                         message: str) -> None:
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=message) as refused:
        airflow_auth_from_environment(HOST)
    assert "two words" not in str(refused.value) and refused.value.exit_code == 2


@pytest.mark.parametrize(("host", "message"), [
    ("", "Airflow needs host"),
    ("airflow.example.com", r"is not an http\(s\) URL"),
    ("https://admin:secret@airflow.example.com", "must not hold credentials"),
    ("https://airflow.example.com/?x=1", "has a query or fragment"),
])
def test_a_host_that_is_not_an_api_url_is_a_config_error(host: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as refused:
        AirflowTarget(host)
    assert "secret" not in str(refused.value)


def test_the_client_is_built_from_airflow_k8s_yml(tmp_path: Path) -> None:
    conf = tmp_path / "conf"
    (conf / "base").mkdir(parents=True)
    (conf / "base" / "airflow-k8s.yml").write_text(
        f"host: {HOST}/\nrun_config:\n  image: img:1\n  dag_id: nightly\n  dags_folder: gs://bucket/dags/\n")
    target = TARGETS["airflow"].build(load_plugin_config(str(conf), "base"))
    assert isinstance(target, AirflowTarget)
    assert (target.host, target.dags_folder, target.dag_id) == (HOST, "gs://bucket/dags", "nightly")
    assert target.console_url() == f"{HOST}/dags/nightly"


def test_publishing_needs_a_dags_folder_and_writes_dag_id_py(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no DAGs folder") as refused:
        AirflowTarget(HOST).check_upload()
    assert "run_config.dags_folder" in str(refused.value)
    target = AirflowTarget(HOST, dags_folder=str(tmp_path / "dags"))
    spec = dag_spec("my-dag", "# a DAG\n")
    assert target.publish(spec["dag_id"], spec["dag_file"]) == str(tmp_path / "dags" / "my-dag.py")
    assert (tmp_path / "dags" / "my-dag.py").read_text() == "# a DAG\n"
    # A new version replaces the file whole (renamed into place: a DAG processor never parses a
    # half-written file), with nothing else left in the folder.
    before = (tmp_path / "dags" / "my-dag.py").stat().st_ino
    target.publish("my-dag", "# a DAG, version 2\n")
    assert (tmp_path / "dags" / "my-dag.py").stat().st_ino != before
    assert [path.name for path in (tmp_path / "dags").iterdir()] == ["my-dag.py"]
    assert target.remove_dag_file("my-dag") and not target.remove_dag_file("my-dag")


def test_airflow_states_map_to_the_targets_states() -> None:
    target = AirflowTarget(HOST, api=ApiV2())
    run = target._run_info({"dag_id": "d", "dag_run_id": "r1", "state": "running", "conf": {"x": 1},
                            "start_date": "2026-12-01T10:00:00.123456Z"}, tasks=())
    assert (run.name, run.run_id, run.state, run.parameters) == ("d/r1", "r1", "RUNNING", {"x": 1})
    assert run.start_time is not None and run.start_time.microsecond == 123456
    assert target.job_name(run) == "d" and target.step_run_id(run) == "r1"
    assert target.console_url(run) == f"{HOST}/dags/d/runs/r1"
    # Airflow 2.10's UI has no page per run or task: views of the DAG's grid.
    from kvx_runtime.targets.airflow import ApiV1
    from kvx_runtime.targets.base import TaskInfo

    task = TaskInfo(name="t 1", state="FAILED", error=None, start=None, end=None, executor=None)
    assert target.logs_url(run, task) == f"{HOST}/dags/d/runs/r1/tasks/t%201"
    old = AirflowTarget(HOST, api=ApiV1())
    assert old.console_url(run) == f"{HOST}/dags/d/grid?dag_run_id=r1"
    assert old.logs_url(run, task) == f"{HOST}/dags/d/grid?dag_run_id=r1&task_id=t%201&tab=logs"
    assert old.console_url() == f"{HOST}/home" and target.console_url() == f"{HOST}/dags"
    states = {raw: target._task_info({"task_id": "t", "state": raw, "try_number": 2, "max_tries": 1}).state
              for raw in ("success", "failed", "upstream_failed", "running", "up_for_retry", "queued", None)}
    assert states == {"success": "SUCCEEDED", "failed": "FAILED", "upstream_failed": "SKIPPED", "running": "RUNNING",
                      "up_for_retry": "RUNNING", "queued": "PENDING", None: "PENDING"}
    failed = target._task_info({"task_id": "t", "state": "failed", "try_number": 2, "max_tries": 1})
    assert failed.error == "failed (try 2 of 2)" and target._try_number(failed) == 2
    assert target._split("other/r9") == ("other", "r9")
    # A bare run id is looked up whatever dag_id is configured: it may be the run-once copy's
    # run, or another pipeline's.
    from kvx_runtime.targets.http import ApiError

    runs = {"mine-run-once": {"r9"}, "other-pipeline": {"r7"}}
    asked: list[str] = []

    def request(method: str, path: str, **kwargs: Any) -> Any:
        asked.append(path)
        _, dag_id, _, run_id = path.split("/")
        if run_id not in runs.get(dag_id, set()):
            raise ApiError("not found", status=404)
        return {}

    configured = AirflowTarget(HOST, dag_id="mine", api=ApiV2())
    configured._request = request  # type: ignore[method-assign]
    configured._pages = lambda path, key, params: iter(  # type: ignore[method-assign]
        [{"dag_id": dag, "dag_run_id": run} for dag, ids in runs.items() for run in ids] if path == "dags/~/dagRuns"
        else [])
    assert configured._split("r9") == ("mine-run-once", "r9")  # the configured DAG's copy: asked directly
    assert asked == ["dags/mine/dagRuns/r9", "dags/mine-run-once/dagRuns/r9"]
    assert configured._split("r7") == ("other-pipeline", "r7")  # else among every DAG's runs
    assert configured.pipeline_name("pkg", "__default__") == "mine"
    assert configured.pipeline_name("pkg", "data_science") == "mine-data_science"
    assert AirflowTarget(HOST, api=ApiV2()).pipeline_name("pkg", "data_science") == "pkg-data-science"


def test_a_dag_file_carries_the_version_of_what_runs() -> None:
    from kvx_runtime.compiler.airflow_render import dag_version

    golden = Path(__file__).resolve().parents[1] / "integration" / "golden" / "example-airflow-local.py"
    text = golden.read_text()
    version = dag_version(text)
    assert version is not None and len(version) == 16
    # As Airflow returns the parsed DAG's doc_md.
    assert dag_version(f"Kedro pipeline ...\n\nkvx-runtime DAG version {version}") == version
    assert dag_version("no version here") is None and dag_version(None) is None


def test_airflow_error_bodies_become_one_line() -> None:
    from kvx_runtime.targets.http import status_message

    assert status_message({"detail": "The Dag with ID: `nope` was not found"}, "HTTP 404") == \
        "The Dag with ID: `nope` was not found"
    conflict = {"detail": {"reason": "Unique constraint violation", "statement": "hidden", "orig_error": "hidden"}}
    assert status_message(conflict, "HTTP 409") == "Unique constraint violation"
    invalid = {"detail": [{"type": "missing", "loc": ["body", "logical_date"], "msg": "Field required"}]}
    assert status_message(invalid, "HTTP 422") == "body.logical_date: Field required"


class _Airflow2Version:
    """A server that answers only Airflow 2's version endpoint, with ``version``."""

    def __init__(self, version: str) -> None:
        import json
        import threading
        from http.server import BaseHTTPRequestHandler, HTTPServer

        class Airflow2(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                found = self.path == "/api/v1/version"
                body = json.dumps({"version": version} if found else {"detail": "Not Found"}).encode()
                self.send_response(200 if found else 404)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self) -> None:  # Airflow 2's web server has no /auth/token
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = HTTPServer(("127.0.0.1", 0), Airflow2)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        return self.url

    def __exit__(self, *_: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_an_airflow_2_older_than_2_10_is_refused_in_one_line() -> None:
    """Airflow 2 answers /api/v1 only: recognised by its version endpoint; before 2.10, refused, exit 2."""
    with _Airflow2Version("2.9.3") as url:
        target = AirflowTarget(url, dag_id="d")
        with pytest.raises(ConfigError, match=r"is Airflow 2\.9\.3: this release talks to Airflow 2\.10 and newer") \
                as refused:
            target.get("d/r1")
        assert refused.value.exit_code == 2


def test_airflow_2_10_is_spoken_to_by_api_v1_with_basic_auth(monkeypatch: pytest.MonkeyPatch) -> None:
    """Airflow 2.10 gets API v1, and a user and password go as HTTP Basic (it has no /auth/token)."""
    import base64

    from kvx_runtime.targets.airflow import ApiV1

    monkeypatch.setenv("KVX_AIRFLOW_USERNAME", "admin")
    monkeypatch.setenv("KVX_AIRFLOW_PASSWORD", "s3cret")
    with _Airflow2Version("2.10.5") as url:
        target = AirflowTarget(url, dag_id="d")
        assert isinstance(target.api, ApiV1) and target.api.prefix == "api/v1"
        expected = "Basic " + base64.b64encode(b"admin:s3cret").decode()
        assert target.session.auth.headers() == {"Authorization": expected}


def test_airflow_2_answers_are_read_as_api_v1_writes_them() -> None:
    """The fields API v1 names differently: the schedule object, the log as str() of (host, text) pairs."""
    from kvx_runtime.targets.airflow import ApiV1, ApiV2

    v1, v2 = ApiV1(), ApiV2()
    assert v1.schedule({"schedule_interval": {"__type": "CronExpression", "value": "0 3 * * *"}}) == "0 3 * * *"
    assert v1.schedule({"schedule_interval": None, "timetable_description": "Never, external triggers only"}) == ""
    assert v2.schedule({"timetable_summary": "None"}) == "" and v2.schedule({"timetable_summary": "@daily"}) == "@daily"
    log = {"content": str([("127.0.0.1", "*** Found local files:\n[2026] INFO - step finished\nexit 1\n")])}
    assert v1.log_lines(log) == ["*** Found local files:", "[2026] INFO - step finished", "exit 1"]
    assert v1.log_lines({"content": "plain text\nsecond"}) == ["plain text", "second"]
    assert v2.log_lines({"content": [{"event": "one"}, "two\nthree", {"event": ""}]}) == ["one", "two", "three"]
    assert v1.source_path("d", {"file_token": "a/b"}) == "dagSources/a%2Fb"
    assert v2.source_path("my dag", {}) == "dagSources/my%20dag"


def test_a_failed_tasks_log_is_told_by_the_steps_own_error_lines() -> None:
    """Airflow's epilogue follows the step's verdict in a task's log: the step's ERROR lines
    (JSON, prefixed by Airflow) are what a failure shows; a log without any, its last lines."""
    from kvx_runtime.targets.airflow import _step_error

    verdict = ('[2026-12-02T11:38:42.6] {subprocess.py:93} INFO - {"severity": "ERROR", "message": '
               '"kvx-runtime exec-node failed: input raw_numbers missing", "exit_code": 2}')
    assert _step_error(verdict) == "kvx-runtime exec-node failed: input raw_numbers missing"
    assert _step_error("[...] INFO - Task exited with return code 1") is None
    assert _step_error('x "severity": "ERROR" {not json') == 'x "severity": "ERROR" {not json'


def test_a_dag_deleted_while_airflow_2_10_still_holds_it_parsed_is_unknown_not_an_error() -> None:
    """Airflow 2.10 answers 500 for the details of a DAG deleted from its database while its
    webserver still holds the parsed DAG; the DAG's own record (404) says it is gone."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from kvx_runtime.targets.airflow import ApiV1

    asked: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            asked.append(self.path)
            status = 500 if self.path.endswith("/details") else 404
            body = b'{"detail": "x"}'
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        target = AirflowTarget(f"http://127.0.0.1:{server.server_address[1]}", auth=NoAuth(), attempts=1,
                               api=ApiV1())
        assert target.find_schedule("gone") is None
        assert asked == ["/api/v1/dags/gone/details", "/api/v1/dags/gone"]
    finally:
        server.shutdown()
        server.server_close()


def test_a_deleted_dag_that_a_late_parse_stores_again_is_deleted_again(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A parse of the DAG file that began before `schedule --delete` removed it stores the DAG
    after the first DELETE: the DAG is deleted again until checks in a row find it gone."""
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from kvx_runtime.targets.airflow import ApiV1

    monkeypatch.setenv("KVX_WATCH_INTERVAL", "0.01")
    asked: list[str] = []
    stored = {"dag": True, "parses_left": 1}  # one late parse brings it back once

    class Handler(BaseHTTPRequestHandler):
        def _answer(self, status: int, body: object) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            asked.append(f"GET {self.path}")
            if "/dagRuns" in self.path:
                self._answer(200, {"dag_runs": [], "total_entries": 0})
            elif stored["dag"]:
                self._answer(200, {"dag_id": "sched", "is_paused": False})
            else:
                self._answer(404, {"detail": "not found"})

        def do_DELETE(self) -> None:
            asked.append(f"DELETE {self.path}")
            stored["dag"] = stored["parses_left"] > 0
            stored["parses_left"] -= 1
            self._answer(204, {})

        def log_message(self, *_: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    (tmp_path / "sched.py").write_text("# the DAG file\n")
    try:
        target = AirflowTarget(f"http://127.0.0.1:{server.server_address[1]}", auth=NoAuth(), attempts=1,
                               api=ApiV1(), dags_folder=str(tmp_path))
        assert target.set_schedule_state("sched", "delete") is None
    finally:
        server.shutdown()
        server.server_close()
    assert not (tmp_path / "sched.py").exists()
    deletes = [line for line in asked if line.startswith("DELETE")]
    assert deletes == ["DELETE /api/v1/dags/sched"] * 2
    # After the second delete, three checks in a row found it gone.
    assert asked[-3:] == ["GET /api/v1/dags/sched/details"] * 3


def test_a_dags_folder_that_fails_is_one_line_with_its_exit_code(monkeypatch: pytest.MonkeyPatch) -> None:
    # google-auth's errors (no OSError) from a gs:// DAGs folder: refused credentials are the
    # user's to fix (exit 2), a transport failure may pass (exit 3); never a traceback.
    import fsspec

    from kvx_runtime.errors import InfrastructureError

    def failing(kind: str, message: str) -> Any:
        error = type(kind, (Exception,), {"__module__": "google.auth.exceptions"})(message)

        def url_to_fs(*args: Any, **kwargs: Any) -> Any:
            raise error
        return url_to_fs

    target = AirflowTarget(HOST, dags_folder="gs://composer-bucket/dags", api=ApiV2())
    monkeypatch.setattr(fsspec.core, "url_to_fs", failing("TransportError", "connection reset"))
    with pytest.raises(InfrastructureError, match="cannot write the DAG file gs://composer-bucket/dags/d.py: "
                                                  "TransportError: connection reset"):
        target.publish("d", "text")
    monkeypatch.setattr(fsspec.core, "url_to_fs", failing("RefreshError", "invalid_grant: Token has been revoked"))
    with pytest.raises(ConfigError, match="the credentials were refused"):
        target.remove_dag_file("d")


def test_a_value_json_cannot_hold_is_refused_when_the_dag_is_written() -> None:
    from kvx_runtime.compiler.airflow_render import _flat

    for value in (float("inf"), float("-inf"), float("nan")):
        with pytest.raises(ConfigError, match="no inf or nan"):
            _flat({"default": value})
    assert _flat({"default": 0.5}) == '{"default": 0.5}'


def test_a_trigger_whose_answer_was_lost_is_its_own_run_not_a_conflict() -> None:
    # The POST is retried after a lost answer: Airflow made the run the first time and answers
    # the retry 409. A run with this run's conf is this run; another conf is a real conflict.
    from kvx_runtime.targets.base import RunRequest
    from kvx_runtime.targets.http import ApiError

    existing = {"dag_id": "d", "dag_run_id": "d-20261204101500", "state": "queued", "conf": {"x": 1}}
    calls: list[tuple[str, str]] = []

    def request(method: str, path: str, **kwargs: Any) -> Any:
        calls.append((method, path))
        if method == "POST":
            raise ApiError("Airflow: conflict", status=409)
        return existing

    target = AirflowTarget(HOST, api=ApiV2())
    target._publish_parsed = lambda spec: ("d", {"is_paused": False}, False)  # type: ignore[method-assign]
    target._request = request  # type: ignore[method-assign]
    run = target.submit(RunRequest(spec={}, run_id="d-20261204101500", display_name="d", parameters={"x": 1}))
    assert (run.name, run.state) == ("d/d-20261204101500", "PENDING")
    assert calls[-1] == ("GET", "dags/d/dagRuns/d-20261204101500")
    with pytest.raises(UsageError, match="already has a run d-20261204101500 of DAG d"):
        target.submit(RunRequest(spec={}, run_id="d-20261204101500", display_name="d", parameters={"x": 2}))


@pytest.mark.parametrize("text", ["deploy 🚀 {{ not jinja }}", "{% raw %} ünïcode {# x #}", "plain 🚀"])
def test_a_literal_in_a_templated_field_renders_as_written(text: str) -> None:
    import jinja2

    from kvx_runtime.compiler.airflow_render import _jinja_literal

    rendered = jinja2.Environment().from_string(_jinja_literal(text)).render()
    assert rendered == text
    rendered.encode()  # no lone surrogates


def test_no_node_takes_the_task_name_of_the_dags_outcome() -> None:
    from kvx_runtime.compiler.airflow_render import OUTCOME_TASK
    from kvx_runtime.compiler.names import unique_task_names

    assert unique_task_names(["pipeline.outcome"]) == {"pipeline.outcome": f"{OUTCOME_TASK}-2"}


def test_retry_delays_are_written_exactly() -> None:
    from kvx_runtime.compiler.airflow_render import _seconds

    assert [_seconds(v) for v in (30.0, 1.5, 1234567.0, 0.001, 3600.25)] == ["30", "1.5", "1234567", "0.001", "3600.25"]
