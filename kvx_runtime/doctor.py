"""``kvx-runtime doctor``: can this container run a step? One line per check.

Checks, in order: the runtime's own packages; the Kedro project loads; ``vertexai.yml`` is
valid; the storage root is reachable and writable; MLflow answers (when configured); auth
headers can be obtained (when configured); code upload: configured or not, and whether the
image's requirements fingerprint matches the project's. Also the smoke test of the images
(``--runtime-only`` for the base image, which holds no project).

The checks that talk to the network (storage, MLflow, auth) run in parallel, together bounded by
``KVX_DOCTOR_TIMEOUT`` seconds (default 3): without a network (libraries retry for minutes) the
doctor answers within seconds. The project's pipelines (the user's libraries: seconds of imports,
CPU-bound) are counted in a child process started first, so they load on another core meanwhile.
Libraries' own log lines and warnings are swallowed while it runs, and stay swallowed while a
check it gave up on is still running, so the table is the last thing printed.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from kvx_runtime import settings
from kvx_runtime.errors import ExitCode, KvxError

if TYPE_CHECKING:
    from kvx_runtime.project import KedroProject


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    code: int = 0


def _timeout() -> float:
    return settings.DOCTOR_TIMEOUT.get()


def _outcome(name: str, function: Callable[[], str]) -> Check:
    try:
        return Check(name, True, function())
    except KvxError as exc:
        return Check(name, False, str(exc), int(exc.exit_code))
    except Exception as exc:  # a check must report, never crash the doctor
        return Check(name, False, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
                     int(ExitCode.INFRASTRUCTURE))


class _Pending:
    """A check running in its own daemon thread (a check given up on keeps it; it ends with
    the process)."""

    def __init__(self, name: str, function: Callable[[], str]) -> None:
        self.name = name
        self._result: list[Check] = []
        self._thread = threading.Thread(target=lambda: self._result.append(_outcome(name, function)),
                                        daemon=True, name=f"kvx-doctor-{name}")
        self._thread.start()

    @property
    def abandoned(self) -> bool:
        return self._thread.is_alive()

    def wait(self, deadline: float, timeout: float) -> Check:
        """Its check, or a failure once ``deadline`` (a ``time.monotonic()``) has passed."""
        self._thread.join(max(0.0, deadline - time.monotonic()))
        if self._result:
            return self._result[0]
        return Check(self.name, False, f"no answer within {timeout:g} s (no network, a firewall, or a wrong "
                     "address?); KVX_DOCTOR_TIMEOUT sets the wait", int(ExitCode.INFRASTRUCTURE))


@contextmanager
def _quiet_libraries(pending: list[_Pending]) -> Iterator[None]:
    """Print only the doctor's own log lines (not libraries', not the checks' threads') and no
    warnings; all again on leaving unless a check in ``pending`` is still running (it would
    print after the table; the process is about to end, and the doctor's verdict still prints)."""
    from kvx_runtime.log import print_only_own_lines

    print_only_own_lines(threading.get_ident())
    caught = warnings.catch_warnings()
    caught.__enter__()
    warnings.simplefilter("ignore")
    try:
        yield
    finally:
        if not any(check.abandoned for check in pending):
            caught.__exit__(None, None, None)
            print_only_own_lines(None)


def _runtime() -> str:
    from kvx_runtime import __version__

    modules = ["kedro", "cloudpickle", "zstandard", "fsspec", "structlog", "tenacity", "pydantic"]
    for module in modules:
        importlib.import_module(module)
    # Installed, not imported: kedro_mlflow imports MLflow (a second); the mlflow check imports
    # it when the project tracks.
    extras = [optional for optional in ("gcsfs", "kedro_mlflow") if importlib.util.find_spec(optional)]
    if "kedro_mlflow" in extras:
        extras[-1] += f" ({_mlflow_distribution()})"
    return (f"kvx-runtime {__version__}, Python {sys.version.split()[0]}, "
            f"optional: {', '.join(extras) or 'none'}")


def _mlflow_distribution() -> str:
    """Which MLflow is installed, from its metadata: full mlflow (server, UI, model flavours'
    dependencies) or mlflow-skinny (the tracking client, what the slim base image holds)."""
    from importlib.metadata import PackageNotFoundError, version

    for name in ("mlflow", "mlflow-skinny"):
        try:
            return f"{name} {version(name)}"
        except PackageNotFoundError:
            continue
    return "no mlflow"


def _count_nodes() -> str:
    from kvx_runtime.project_pipelines import load_pipeline, pipeline_import_errors_raised

    with pipeline_import_errors_raised():
        count = len(load_pipeline("__default__").nodes)
    return f"{count} nodes in __default__"


class _NodeCount:
    """:func:`_count_nodes` in a child process (``python -m kvx_runtime.doctor PATH``), which
    prints its :class:`Check` as one JSON line last."""

    def __init__(self, project_path: str | None, env: str | None) -> None:
        path = str(Path(project_path or os.getcwd()).expanduser().resolve())
        child_env = {**os.environ, **({"KEDRO_ENV": env} if env else {})}
        self._process = subprocess.Popen([sys.executable, "-m", "kvx_runtime.doctor", path], env=child_env,
                                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)

    def result(self) -> Check:
        output, _ = self._process.communicate()
        for line in reversed(output.splitlines()):
            try:
                return Check(**json.loads(line))
            except (ValueError, TypeError):
                continue
        return Check("project", False, f"counting the pipelines' nodes ended with exit code {self._process.returncode}"
                     " and no answer", int(ExitCode.INFRASTRUCTURE))

    def stop(self) -> None:
        if self._process.poll() is None:
            self._process.kill()
            self._process.wait()


def _count_nodes_in_child(project_path: str) -> None:
    """The child's side of :class:`_NodeCount`."""
    def count() -> str:
        # Kedro's own bootstrap, not open_project's (its config schema is not needed here);
        # the parent has already reported a project that does not open.
        from kedro.framework.startup import bootstrap_project

        bootstrap_project(Path(project_path))
        return _count_nodes()

    check = _outcome("project", count)
    print(json.dumps(asdict(check)), flush=True)


def run_doctor(project_path: str | None, env: str | None, storage_root: str | None,
               runtime_only: bool, echo: Callable[[str], Any] = click.echo) -> int:
    node_count = None if runtime_only else _NodeCount(project_path, env)
    try:
        return _run_checks(project_path, env, storage_root, runtime_only, echo, node_count)
    finally:
        if node_count is not None:
            node_count.stop()


def _run_checks(project_path: str | None, env: str | None, storage_root: str | None, runtime_only: bool,
                echo: Callable[[str], Any], node_count: _NodeCount | None) -> int:
    checks: list[Check] = [_outcome("runtime", _runtime)]
    echo_check(checks[-1], echo)
    if node_count is None:
        return _exit_code(checks)

    state: dict[str, KedroProject] = {}  # "project", once its check opened it

    def project() -> str:
        from kvx_runtime.config import STEP_KEYS
        from kvx_runtime.project import open_project

        state["project"] = open_project(project_path, env, needed=STEP_KEYS)
        return f"{state['project'].package_name} (env {state['project'].env})"

    def config() -> str:
        from kvx_runtime.config import load_plugin_config, read_raw_plugin_config

        loaded = state["project"]
        load_plugin_config(loaded.conf_source, loaded.env, base_env=loaded.base_env)
        _, files = read_raw_plugin_config(loaded.conf_source, loaded.env, base_env=loaded.base_env)
        root = Path(loaded.conf_source)
        names = [str(Path(path).relative_to(root)) if Path(path).is_relative_to(root) else path for path in files]
        return f"{', '.join(names)} valid" if names else "no plugin config file (defaults)"

    def storage() -> str:
        from kvx_runtime.config import resolve_storage_root
        from kvx_runtime.storage.store import BlobStore, RetryPolicy

        loaded = state["project"]
        root = resolve_storage_root(storage_root, loaded.plugin_config.run_config.root, required=True)
        assert root is not None
        BlobStore(root, "kvx-doctor", retry=RetryPolicy(attempts=1)).check_writable()
        return f"{root} is writable"

    def mlflow() -> str:
        from kvx_runtime.mlflow import connect, mlflow_enabled, unread_mlflow_files

        loaded = state["project"]
        if not mlflow_enabled(loaded):
            files = unread_mlflow_files(loaded)
            if not files:
                return "not configured (skipped)"
            unread = [str(path.relative_to(loaded.path) if path.is_relative_to(loaded.path) else path)
                      for path in files]
            envs = sorted({path.parent.name for path in files})
            return (f"off for the steps: {', '.join(unread)} is in env {', '.join(envs)}, which steps of env "
                    f"{loaded.env} do not read; compile with --env {envs[0]} or move it to conf/{loaded.base_env}")
        connection = connect(loaded)
        return f"{connection.tracking_uri} answers, experiment '{connection.experiment_name}'"

    def auth() -> str:
        from kvx_runtime.auth import active_provider, build_request_header_provider

        loaded = state["project"]
        provider = active_provider() or build_request_header_provider(
            loaded.plugin_config.run_config.mlflow.cls,
            dict(loaded.plugin_config.run_config.mlflow.request_header_provider_params),
        )
        if provider is None:
            return "not configured (skipped)"
        headers = provider.request_headers()
        return f"{type(provider).__name__} gave headers: {', '.join(sorted(headers)) or 'none'}"

    def code() -> str:
        from kvx_runtime.code_upload import IMAGE_FINGERPRINT, requirements_fingerprint

        loaded = state["project"]
        configured = loaded.plugin_config.run_config.code_upload
        recorded = loaded.path / IMAGE_FINGERPRINT
        workspace = requirements_fingerprint(loaded.path)
        if not recorded.is_file():
            return (f"code upload {'on' if configured else 'off'}; no {IMAGE_FINGERPRINT} here (not an image "
                    "built from the project template)")
        image = recorded.read_text(encoding="utf-8").split()[0] if recorded.read_text().strip() else ""
        if image != workspace:
            from kvx_runtime.errors import ConfigError

            raise ConfigError(f"the image's requirements fingerprint {image[:12]} differs from the project's "
                              f"{workspace[:12]}: code upload would refuse to run; rebuild the image")
        return f"code upload {'on' if configured else 'off'}; the image's requirements match the project's"

    timeout = _timeout()
    # One answer per request within the doctor's wait, not MLflow's minutes of retries.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(max(1, int(timeout))))
    networked = {"storage": storage, "mlflow": mlflow, "auth": auth}
    pending: list[_Pending] = []
    with _quiet_libraries(pending):
        opened = _outcome("project", project)
        if "project" not in state:
            for check in (opened, *(_skipped(name) for name in ("config", *networked, "code"))):
                checks.append(check)
                echo_check(check, echo)
            return _exit_code(checks)
        # The checks that may wait on the network run together, while the child counts the
        # pipelines' nodes: the doctor waits for the slowest.
        deadline = time.monotonic() + timeout
        pending.extend(_Pending(name, function) for name, function in networked.items())
        counted = node_count.result()
        checks.append(Check("project", counted.ok, f"{opened.detail}, {counted.detail}", counted.code))
        echo_check(checks[-1], echo)
        checks.append(_outcome("config", config))
        echo_check(checks[-1], echo)
        code_check = _outcome("code", code)
        for check in (*(each.wait(deadline, timeout) for each in pending), code_check):
            checks.append(check)
            echo_check(check, echo)
    return _exit_code(checks)


def _skipped(name: str) -> Check:
    return Check(name, False, "skipped: the project did not load", int(ExitCode.USAGE))


def echo_check(check: Check, echo: Callable[[str], Any]) -> None:
    echo(f"{'ok  ' if check.ok else 'FAIL'} {check.name:<8} {check.detail}")


def _exit_code(checks: list[Check]) -> int:
    failed = [c.code or int(ExitCode.NODE_FAILED) for c in checks if not c.ok]
    return max(failed) if failed else 0


if __name__ == "__main__":
    _count_nodes_in_child(sys.argv[1])
