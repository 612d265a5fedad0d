"""Real Airflow deployments on 127.0.0.1 for the tests of kvx-runtime's Airflow REST client.

``start_airflow_server`` runs the processes of a small deployment of one :class:`Deployment`,
from its virtualenv (``airflow_env.find_or_build``), each in a process group of its own and
logging to a file under ``root``, on a fresh SQLite database.

``AIRFLOW_3`` (``.venv-airflow``; REST API v2, as Cloud Composer 3):

* ``airflow api-server`` on a free port of 127.0.0.1 (the REST API, ``/api/v2``, and the
  execution API the tasks report to, ``/execution/``);
* ``airflow scheduler`` with the LocalExecutor, which Airflow 3.3 accepts on SQLite (as
  ``airflow standalone`` runs it), and its log server on a free port: the API server reads a
  running task's log from it (and from the file, the same machine's) under the hostname
  ``loopback_hostname`` gives every task, 127.0.0.1;
* ``airflow dag-processor``, which parses the DAG folder (Airflow 3 runs it apart from the
  scheduler), set to look for new files every few seconds.

Authentication is the SimpleAuthManager's, with one admin user whose password is written to its
passwords file before anything starts; the API takes the JWT ``/auth/token`` gives for it.

``AIRFLOW_2`` (``.venv-airflow2``, Airflow 2.10; REST API v1, as Cloud Composer 2):

* ``airflow webserver`` (one gunicorn worker) on a free port of 127.0.0.1: the UI and ``/api/v1``,
  which takes HTTP Basic auth of the FAB user ``airflow users create`` makes an Admin;
* ``airflow scheduler``, which parses the DAG folder itself (Airflow 2's default) and runs the
  tasks with the SequentialExecutor, the one Airflow 2 allows on SQLite: one task at a time,
  each an ``airflow tasks run`` process the scheduler waits for.

No triggerer in either: nothing the tests run defers. The processes run with the environment a
``--operator local`` DAG's tasks need to run ``kvx-runtime exec-node``: the Kedro venv's ``bin``
first on PATH, this checkout on PYTHONPATH, plus the caller's ``extra_env`` (MLflow's URI, say).
"""

from __future__ import annotations

import atexit
import base64
import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from integration.airflow_env import AIRFLOW, AIRFLOW2, REPO, AirflowEnv, AirflowVenv, DagRun

#: Where the deployment's processes cache their bytecode (gitignored, as .venv-*/).
PYCACHE = Path(os.environ.get("KVX_TEST_AIRFLOW_PYCACHE", REPO / ".venv-airflow-pycache"))
USERNAME = "admin"
PASSWORD = "kvx-airflow-Passw0rd!"
#: How long the deployment may take to answer with a healthy scheduler (2 slow cores).
STARTUP_TIMEOUT = 120.0
#: The intervals that make a new DAG file run within seconds on Airflow 3 (its defaults in comments).
FAST_INTERVALS = {
    # Listing the DAG folder for new files (300 s) and re-parsing a known file (30 s).
    "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "2",
    "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "2",
    "AIRFLOW__DAG_PROCESSOR__BUNDLE_REFRESH_CHECK_INTERVAL": "1",  # 5 s
    "AIRFLOW__DAG_PROCESSOR__PARSING_PROCESSES": "1",  # 2: one core is the tests'
    "AIRFLOW__DAG_PROCESSOR__PRINT_STATS_INTERVAL": "0",  # 30 s
    # A DAG file deleted is a DAG deactivated after this long past the folder's next parse (50 s).
    "AIRFLOW__DAG_PROCESSOR__STALE_DAG_THRESHOLD": "10",
    "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "1",  # 5 s
    # How often a running task asks whether it should still run (5 s): a cancelled run's tasks
    # are killed this long after.
    "AIRFLOW__WORKERS__MIN_HEARTBEAT_INTERVAL": "1",
    "AIRFLOW__SCHEDULER__SCHEDULER_IDLE_SLEEP_TIME": "0.5",  # 1 s
    "AIRFLOW__SCHEDULER__PARSING_CLEANUP_INTERVAL": "5",  # 60 s
}
#: The same on Airflow 2.10, where the scheduler parses the DAG folder ([scheduler] options).
FAST_INTERVALS_2 = {
    "AIRFLOW__SCHEDULER__DAG_DIR_LIST_INTERVAL": "2",  # 300 s
    "AIRFLOW__SCHEDULER__MIN_FILE_PROCESS_INTERVAL": "2",  # 30 s
    "AIRFLOW__SCHEDULER__PARSING_PROCESSES": "1",  # 2
    "AIRFLOW__SCHEDULER__PRINT_STATS_INTERVAL": "0",  # 30 s
    "AIRFLOW__SCHEDULER__STALE_DAG_THRESHOLD": "10",  # 50 s
    "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "1",  # 5 s
    # A running task's heartbeat, when it learns that it should stop (5 s).
    "AIRFLOW__SCHEDULER__JOB_HEARTBEAT_SEC": "1",
    "AIRFLOW__SCHEDULER__SCHEDULER_IDLE_SLEEP_TIME": "0.5",  # 1 s
    "AIRFLOW__SCHEDULER__PARSING_CLEANUP_INTERVAL": "5",  # 60 s
}
#: A parsed file's DAG (its tasks, params, doc_md: what runs) is rewritten at most this often,
#: whereas its source (dagSources), description and tags are updated on every parse. Kept at
#: Airflow's default (30 s), as on Composer: the journey's second run-once of a changed DAG
#: proves that kvx-runtime waits for the new tasks, not for the new source.
MIN_SERIALIZED_DAG_UPDATE_INTERVAL = "30"


@dataclass
class AirflowServer:
    """A running deployment: ``url`` is the base URL of its REST API (``/api/v2/...`` and
    ``/auth/token`` on Airflow 3, ``/api/v1/...`` on Airflow 2)."""

    url: str
    port: int
    dags_folder: Path
    username: str
    password: str
    home: Path
    #: The environment every Airflow process runs with (the tasks inherit it).
    env: dict[str, str]
    #: The ``airflow`` CLI of the deployment's venv: run it with ``env`` to share its database.
    airflow: Path
    #: Where each process logs (``<name>.log`` under the root given to ``start_airflow_server``).
    logs: dict[str, Path]
    #: Airflow's major version: 3 (REST API v2, a JWT) or 2 (REST API v1, HTTP Basic auth).
    major: int = 3
    #: Seconds from the first command (``db migrate``) to a healthy scheduler.
    startup_seconds: float = 0.0
    processes: dict[str, subprocess.Popen] = field(default_factory=dict, repr=False)
    _token: str | None = field(default=None, repr=False)

    @property
    def api_root(self) -> str:
        """The REST API's path prefix: ``/api/v2`` or ``/api/v1``."""
        return f"/api/v{self.major - 1}"

    def token(self) -> str:
        """A fresh access token (a JWT) of the admin user, for ``Authorization: Bearer`` (Airflow 3)."""
        if self.major != 3:
            raise RuntimeError(f"Airflow {self.major}'s API takes HTTP Basic auth, not a token")
        status, body = request(self.url, "POST", "/auth/token",
                               {"username": self.username, "password": self.password})
        if status != 201 or not isinstance(body, dict) or "access_token" not in body:
            raise RuntimeError(f"POST /auth/token answered {status}: {body}")
        return str(body["access_token"])

    def api(self, method: str, path: str, body: Any = None, token: str | None = None,
            headers: dict[str, str] | None = None) -> tuple[int, Any]:
        """One request to the API as the admin: (status, JSON body or text). Airflow 3: with the
        admin's token (or ``token``), asked for once: it lasts a day (``[api_auth]
        jwt_expiration_time``). Airflow 2: with the admin's name and password (HTTP Basic)."""
        if self.major == 2:
            return request(self.url, method, path, body, headers=headers,
                           basic=(self.username, self.password))
        if token is None:
            self._token = self._token or self.token()
            token = self._token
        return request(self.url, method, path, body, token, headers)

    def wait_for_dag(self, dag_id: str, timeout: float = 60) -> dict[str, Any]:
        """The DAG as the API shows it, once the scheduler (or DAG processor) has parsed its file."""
        def parsed() -> dict[str, Any] | None:
            status, body = self.api("GET", f"{self.api_root}/dags/{_segment(dag_id)}")
            return body if status == 200 else None

        dag, _ = poll(f"DAG {dag_id} parsed", parsed, timeout)
        return dag

    def run_dag(self, dag_id: str, conf: dict[str, Any] | None = None, timeout: float = 900) -> DagRun:
        """Unpause ``dag_id`` (parsed), trigger one run of it with ``conf`` and wait for its end:
        the run's and its tasks' states as the REST API gives them, and each task's log (``output``)."""
        dag = f"{self.api_root}/dags/{_segment(dag_id)}"
        status, body = self.api("PATCH", dag, {"is_paused": False})
        if status != 200:
            raise RuntimeError(f"PATCH {dag} answered {status}: {body}")
        trigger: dict[str, Any] = {"conf": conf or {}}
        if self.major == 3:
            trigger["logical_date"] = None  # required there, and may be null
        status, body = self.api("POST", f"{dag}/dagRuns", trigger)
        if status != 200:
            raise RuntimeError(f"POST {dag}/dagRuns answered {status}: {body}")
        run_id = str(body["dag_run_id"])
        run = f"{dag}/dagRuns/{_segment(run_id)}"

        def finished() -> dict[str, Any] | None:
            status, body = self.api("GET", run)
            return body if status == 200 and body["state"] in ("success", "failed") else None

        ended, _ = poll(f"the run {run_id} of {dag_id} finished", finished, timeout, every=1)
        status, body = self.api("GET", f"{run}/taskInstances")
        if status != 200:
            raise RuntimeError(f"GET {run}/taskInstances answered {status}: {body}")
        instances = body["task_instances"]
        logs = [f"--- {item['task_id']} ({item['state']}) ---\n"
                + self.task_log(dag_id, run_id, item["task_id"], item["try_number"])
                for item in instances if item["try_number"]]  # 0: never ran (upstream failed)
        return DagRun(run_id=run_id, state=ended["state"], output="\n".join(logs),
                      tasks={item["task_id"]: item["state"] for item in instances})

    def task_log(self, dag_id: str, run_id: str, task_id: str, try_number: int = 1) -> str:
        """A task's log as text (``Accept: text/plain``)."""
        path = (f"{self.api_root}/dags/{_segment(dag_id)}/dagRuns/{_segment(run_id)}/taskInstances/"
                f"{_segment(task_id)}/logs/{try_number}")
        status, body = self.api("GET", path, headers={"Accept": "text/plain"})
        if status != 200:
            raise RuntimeError(f"GET {path} answered {status}: {body}")
        return body if isinstance(body, str) else json.dumps(body)

    def log_tails(self, chars: int = 2500) -> str:
        return "\n".join(f"--- {name} ({path}) ---\n{_tail(path, chars)}" for name, path in self.logs.items())

    def stop(self) -> None:
        """SIGTERM to each process group, SIGKILL to what is left 5 s later (Airflow 3's scheduler
        exits in about 4 s; its API server's parent process takes over 10 s after its app stopped)."""
        _stop_all(self.processes)


def request(url: str, method: str, path: str, body: Any = None, token: str | None = None,
            headers: dict[str, str] | None = None, timeout: float = 30,
            basic: tuple[str, str] | None = None) -> tuple[int, Any]:
    """(status, JSON body, or text when the answer is not JSON); error statuses are returned too.
    ``token``: a bearer token; ``basic``: a (username, password) for HTTP Basic auth."""
    data = None if body is None else json.dumps(body).encode()
    sent = {"Accept": "application/json", **(headers or {})}
    if data is not None:
        sent["Content-Type"] = "application/json"
    if token:
        sent["Authorization"] = f"Bearer {token}"
    if basic:
        sent["Authorization"] = "Basic " + base64.b64encode(":".join(basic).encode()).decode()
    req = urllib.request.Request(url + path, data=data, method=method, headers=sent)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as answer:
            status, raw = answer.status, answer.read()
    except urllib.error.HTTPError as error:
        status, raw = error.code, error.read()
    text = raw.decode(errors="replace")
    try:
        return status, json.loads(text) if text else None
    except json.JSONDecodeError:
        return status, text


def poll(what: str, check: Callable[[], Any], timeout: float = 60, every: float = 0.25) -> tuple[Any, float]:
    """Call ``check`` until it returns something truthy: (that, seconds it took)."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        found = check()
        if found:
            return found, time.monotonic() - started
        time.sleep(every)
    raise AssertionError(f"{what}: not within {timeout} s")


def _segment(text: str) -> str:
    """``text`` as one segment of a URL's path (run ids hold ``:`` and ``+``)."""
    return urllib.parse.quote(text, safe="")


def loopback_hostname() -> str:
    """``[core] hostname_callable`` of the deployment: the host the API server fetches logs from."""
    return "127.0.0.1"


def _tail(path: Path, chars: int) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError as error:
        return f"({error})"


def _stop_all(processes: dict[str, subprocess.Popen], grace: float = 5.0) -> None:
    running = [process for process in processes.values() if process.poll() is None]
    for process in running:
        _signal_group(process, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for process in running:
        try:
            process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    # The group may hold children (task runners, parsing processes) after its leader exited.
    for process in processes.values():
        _signal_group(process, signal.SIGKILL)
        if process.poll() is None:
            process.wait(timeout=10)


def _signal_group(process: subprocess.Popen, signum: int) -> None:
    try:
        os.killpg(process.pid, signum)  # start_new_session: the group's id is the leader's pid
    except (ProcessLookupError, PermissionError):
        pass


@dataclass(frozen=True)
class Deployment:
    """What differs between the Airflow versions a deployment can be of; the process management
    (starting, health polling, stopping) is ``start_airflow_server``'s for both."""

    venv: AirflowVenv
    major: int
    #: root, port, url -> the version's own settings of every process's environment.
    settings: Callable[[Path, int, str], dict[str, str]]
    #: (log name, airflow CLI arguments) run one after the other before the servers start.
    setup: tuple[tuple[str, tuple[str, ...]], ...]
    #: port -> log name -> the airflow CLI arguments of each long-running process.
    commands: Callable[[int], dict[str, list[str]]]
    #: The server -> True when it is healthy, else what it last said (for the timeout's message).
    health: Callable[[AirflowServer], object]


def _settings_3(root: Path, port: int, url: str) -> dict[str, str]:
    return {
        **FAST_INTERVALS,
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        # The LocalExecutor starts this many worker processes up front (32 by default).
        "AIRFLOW__CORE__PARALLELISM": "4",
        "AIRFLOW__DAG_PROCESSOR__DAG_BUNDLE_STORAGE_PATH": str(root / "bundles"),
        "AIRFLOW__API__HOST": "127.0.0.1",
        "AIRFLOW__API__PORT": str(port),
        "AIRFLOW__API__BASE_URL": url,
        "AIRFLOW__API__WORKERS": "1",
        # Where the tasks (started by the scheduler) report their state: this API server.
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{url}/execution/",
        # Shared by all processes: the API server signs the tasks' tokens the scheduler asks for.
        # (64 bytes or more: PyJWT warns of shorter HS512 keys.)
        "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_urlsafe(64),
        "AIRFLOW__API__SECRET_KEY": secrets.token_urlsafe(64),
        "AIRFLOW__CORE__AUTH_MANAGER":
            "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{USERNAME}:admin",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "false",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(root / "passwords.json"),
    }


def _settings_2(root: Path, port: int, url: str) -> dict[str, str]:
    return {
        **FAST_INTERVALS_2,
        # The only executor Airflow 2 runs on SQLite (the LocalExecutor is refused there).
        "AIRFLOW__CORE__EXECUTOR": "SequentialExecutor",
        "AIRFLOW__WEBSERVER__WEB_SERVER_HOST": "127.0.0.1",
        "AIRFLOW__WEBSERVER__WEB_SERVER_PORT": str(port),
        "AIRFLOW__WEBSERVER__BASE_URL": url,
        "AIRFLOW__WEBSERVER__SECRET_KEY": secrets.token_urlsafe(64),
        # One gunicorn worker (4), never replaced while the session lasts (one every 100 min).
        "AIRFLOW__WEBSERVER__WORKERS": "1",
        "AIRFLOW__WEBSERVER__WORKER_REFRESH_BATCH_SIZE": "0",
        # gunicorn 23+ opens a control socket in ~/.gunicorn, the same path for every deployment.
        "GUNICORN_CMD_ARGS": "--no-control-socket",
        # Composer 2's REST API authentication: HTTP Basic for clients, the session for the UI.
        "AIRFLOW__API__AUTH_BACKENDS": "airflow.api.auth.backend.basic_auth,airflow.api.auth.backend.session",
    }


def _health_3(server: AirflowServer) -> object:
    status, version = request(server.url, "GET", "/api/v2/version", timeout=5)
    if status != 200:
        return status, version
    status, health = request(server.url, "GET", "/api/v2/monitor/health", timeout=5)
    if not (status == 200 and isinstance(health, dict)
            and health.get("scheduler", {}).get("status") == "healthy"
            and (health.get("dag_processor") or {}).get("status") == "healthy"):
        return health
    # The execution API (what tasks report to) is built on its first request, seconds on 2
    # cores: here rather than in the first task's start.
    status, ping = request(server.url, "GET", "/execution/health/ping", timeout=60)
    return True if status == 200 else ("execution API", status, ping)


def _health_2(server: AirflowServer) -> object:
    status, health = request(server.url, "GET", "/health", timeout=5)
    if not (status == 200 and isinstance(health, dict) and health.get("scheduler", {}).get("status") == "healthy"):
        return status, health
    status, version = request(server.url, "GET", "/api/v1/version", timeout=5)
    return True if status == 200 else (status, version)


AIRFLOW_3 = Deployment(
    venv=AIRFLOW, major=3, settings=_settings_3, setup=(("db-migrate", ("db", "migrate")),),
    commands=lambda port: {
        "api-server": ["api-server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        "scheduler": ["scheduler"],
        "dag-processor": ["dag-processor"],
    },
    health=_health_3)
AIRFLOW_2 = Deployment(
    venv=AIRFLOW2, major=2, settings=_settings_2,
    setup=(("db-migrate", ("db", "migrate")),
           ("users-create", ("users", "create", "--role", "Admin", "--username", USERNAME, "--password", PASSWORD,
                             "--email", "admin@kvx.invalid", "--firstname", "kvx", "--lastname", "admin"))),
    commands=lambda port: {
        "webserver": ["webserver", "--hostname", "127.0.0.1", "--port", str(port), "--workers", "1"],
        "scheduler": ["scheduler"],
    },
    health=_health_2)


def airflow_env(found: AirflowEnv, root: Path, port: int, extra_env: dict[str, str],
                deployment: Deployment = AIRFLOW_3) -> dict[str, str]:
    """The environment of every process of the deployment (and so of its tasks)."""
    from conftest import LOOPBACK_ONLY, free_port

    url = f"http://127.0.0.1:{port}"
    env = found.env()
    env.update(LOOPBACK_ONLY)
    env.update(
        # A deployment, not Airflow's unit-test set-up (which unpauses new DAGs and loads examples).
        AIRFLOW__CORE__UNIT_TEST_MODE="false",
        AIRFLOW__CORE__LOAD_EXAMPLES="false",
        AIRFLOW__CORE__DAGS_FOLDER=str(root / "dags"),
        AIRFLOW__CORE__PLUGINS_FOLDER=str(root / "plugins"),
        AIRFLOW__CORE__MIN_SERIALIZED_DAG_UPDATE_INTERVAL=MIN_SERIALIZED_DAG_UPDATE_INTERVAL,
        AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=f"sqlite:///{found.home / 'airflow.db'}",
        AIRFLOW__LOGGING__BASE_LOG_FOLDER=str(root / "task-logs"),
        # The log servers of the scheduler and triggerer default to fixed ports (8793, 8794), and
        # the API server asks a running task's host for its log: 127.0.0.1, not the machine's name.
        AIRFLOW__CORE__HOSTNAME_CALLABLE="integration.airflow_server.loopback_hostname",
        AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT=str(free_port()),
        AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT=str(free_port()),
    )
    env.update(deployment.settings(root, port, url))
    env.update(
        # The tasks run `kvx-runtime` from PATH: the Kedro venv's, with this checkout's code.
        # Then Airflow's own bin: Airflow 2's executors start each task as `airflow tasks run`.
        PATH=os.pathsep.join([str(Path(sys.executable).parent), str(found.python.parent), env.get("PATH", "")]),
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])),
        KVX_LOG_FORMAT="json",
        # Bytecode cached outside the venvs and the checkout: without it each process (and each
        # task) compiles Airflow's thousands of modules again, tens of seconds on 2 cores.
        PYTHONPYCACHEPREFIX=str(PYCACHE),
    )
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env.update(extra_env)
    return env


def start_airflow_server(root: Path, extra_env: dict[str, str], found: AirflowEnv | None = None,
                         timeout: float = STARTUP_TIMEOUT, deployment: Deployment = AIRFLOW_3) -> AirflowServer:
    """Migrate a fresh SQLite database in ``root/home`` and start ``deployment``'s processes
    (``found``: its venv); return when the API answers and the scheduler is healthy
    (RuntimeError with each process's log tail if not within ``timeout`` seconds; everything
    started is stopped then).

    ``extra_env`` is applied last: it may also override the deployment's settings."""
    from conftest import free_port
    from integration.airflow_env import find_or_build

    root.mkdir(parents=True, exist_ok=True)
    if found is None:
        built = find_or_build(root / "home", deployment.venv)
        if isinstance(built, str):
            raise RuntimeError(built)
        found = built
    started = time.monotonic()
    port = free_port()
    env = airflow_env(found, root, port, extra_env, deployment)
    for folder in ("dags", "plugins", "task-logs", "bundles"):
        (root / folder).mkdir(exist_ok=True)
    if deployment.major == 3:  # the SimpleAuthManager's; Airflow 2's user is made by its setup
        (root / "passwords.json").write_text(json.dumps({USERNAME: PASSWORD}) + "\n")
    airflow = found.python.parent / "airflow"
    commands = deployment.commands(port)
    server = AirflowServer(
        url=f"http://127.0.0.1:{port}", port=port, dags_folder=root / "dags", username=USERNAME,
        password=PASSWORD, home=found.home, env=env, airflow=airflow, major=deployment.major,
        logs={name: root / f"{name}.log" for name in (*(name for name, _ in deployment.setup), *commands)},
    )
    for name, args in deployment.setup:
        with server.logs[name].open("wb") as log:
            done = subprocess.run([str(airflow), *args], env=env, cwd=root, stdout=log,
                                  stderr=subprocess.STDOUT, timeout=300)
        if done.returncode != 0:
            raise RuntimeError(f"airflow {' '.join(args[:2])} failed ({done.returncode}):\n{server.log_tails()}")
    atexit.register(server.stop)  # should the session end without the fixture's finalizer
    try:
        for name, args in commands.items():
            with server.logs[name].open("wb") as log:
                server.processes[name] = subprocess.Popen(
                    [str(airflow), *args], env=env, cwd=root, stdout=log, stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL, start_new_session=True)
        _wait_until_healthy(server, deployment, started + timeout)
    except BaseException:
        server.stop()
        raise
    server.startup_seconds = time.monotonic() - started
    return server


def _wait_until_healthy(server: AirflowServer, deployment: Deployment, deadline: float) -> None:
    last: object = "no answer yet"
    while time.monotonic() < deadline:
        exited = {name: process.returncode for name, process in server.processes.items() if process.poll() is not None}
        if exited:
            raise RuntimeError(f"Airflow processes exited early {exited}:\n{server.log_tails()}")
        try:
            last = deployment.health(server)
            if last is True:
                return
        except OSError as error:  # not listening yet
            last = error
        time.sleep(0.5)
    raise RuntimeError(f"Airflow did not come up healthy in time (last: {last}):\n{server.log_tails()}")
