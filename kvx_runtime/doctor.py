"""``kvx-runtime doctor``: can this container run a step? One line per check.

Checks, in order: the runtime's own packages; the Kedro project loads; ``vertexai.yml`` is
valid; the storage root is reachable and writable; MLflow answers (when configured); auth
headers can be obtained (when configured); code upload: configured or not, and whether the
image's requirements fingerprint matches the project's. Also the smoke test of the images
(``--runtime-only`` for the base image, which holds no project).

Without a network, a check that would wait (libraries retry for minutes) fails after
``KVX_DOCTOR_TIMEOUT`` seconds (default 10) instead; libraries' own log lines are kept out of
the way, so the answer is one line per check.
"""

from __future__ import annotations

import importlib
import logging
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
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


#: Libraries that log their own retries and tracebacks while a check waits for the network.
_NOISY_LOGGERS = ("gcsfs", "s3fs", "botocore", "aiobotocore", "fsspec", "google", "urllib3", "aiohttp", "mlflow",
                  "kedro_mlflow", "asyncio")


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


def _run_check(name: str, function: Callable[[], str], timeout: float | None = None) -> Check:
    """Run one check; with ``timeout``, give up waiting after that many seconds (the check
    keeps its daemon thread, which ends with the process)."""
    if timeout is None:
        return _outcome(name, function)
    result: list[Check] = []
    worker = threading.Thread(target=lambda: result.append(_outcome(name, function)), daemon=True,
                              name=f"kvx-doctor-{name}")
    worker.start()
    worker.join(timeout)
    if result:
        return result[0]
    return Check(name, False, f"no answer within {timeout:g} s (no network, a firewall, or a wrong "
                 "address?); KVX_DOCTOR_TIMEOUT sets the wait", int(ExitCode.INFRASTRUCTURE))


@contextmanager
def _quiet_libraries() -> Iterator[None]:
    loggers = [logging.getLogger(name) for name in _NOISY_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _runtime() -> str:
    import sys

    from kvx_runtime import __version__

    modules = ["kedro", "cloudpickle", "zstandard", "fsspec", "structlog", "tenacity", "pydantic"]
    for module in modules:
        importlib.import_module(module)
    extras = []
    for optional in ("gcsfs", "kedro_mlflow"):
        try:
            importlib.import_module(optional)
            extras.append(optional)
        except ImportError:
            pass
    return (f"kvx-runtime {__version__}, Python {sys.version.split()[0]}, "
            f"optional: {', '.join(extras) or 'none'}")


def run_doctor(project_path: str | None, env: str | None, storage_root: str | None,
               runtime_only: bool, echo: Callable[[str], Any] = click.echo) -> int:
    checks: list[Check] = [_run_check("runtime", _runtime)]
    echo_check(checks[-1], echo)
    if runtime_only:
        return _exit_code(checks)

    state: dict[str, KedroProject] = {}  # "project", once its check opened it

    def project() -> str:
        from kvx_runtime.config import STEP_KEYS
        from kvx_runtime.project import open_project

        state["project"] = open_project(project_path, env, needed=STEP_KEYS)
        from kedro.framework.project import pipelines

        count = sum(len(p.nodes) for name, p in pipelines.items() if name == "__default__")
        return f"{state['project'].package_name} (env {state['project'].env}), {count} nodes in __default__"

    def config() -> str:
        from kvx_runtime.config import load_plugin_config

        loaded = state["project"]
        load_plugin_config(loaded.conf_source, loaded.env, base_env=loaded.base_env)
        return "vertexai.yml is valid"

    def storage() -> str:
        from kvx_runtime.config import resolve_storage_root
        from kvx_runtime.storage.store import BlobStore, RetryPolicy

        loaded = state["project"]
        root = resolve_storage_root(storage_root, loaded.plugin_config.run_config.root, required=True)
        assert root is not None
        BlobStore(root, "kvx-doctor", retry=RetryPolicy(attempts=1)).check_writable()
        return f"{root} is writable"

    def mlflow() -> str:
        from kvx_runtime.mlflow import connect, mlflow_enabled

        loaded = state["project"]
        if not mlflow_enabled(loaded):
            return "not configured (skipped)"
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

    # One answer per request, not MLflow's minutes of retries.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    networked = {"storage", "mlflow", "auth"}
    with _quiet_libraries():
        for name, function in (("project", project), ("config", config), ("storage", storage),
                               ("mlflow", mlflow), ("auth", auth), ("code", code)):
            if "project" not in state and name != "project":
                checks.append(Check(name, False, "skipped: the project did not load", int(ExitCode.USAGE)))
            else:
                checks.append(_run_check(name, function, _timeout() if name in networked else None))
            echo_check(checks[-1], echo)
    return _exit_code(checks)


def echo_check(check: Check, echo: Callable[[str], Any]) -> None:
    echo(f"{'ok  ' if check.ok else 'FAIL'} {check.name:<8} {check.detail}")


def _exit_code(checks: list[Check]) -> int:
    failed = [c.code or int(ExitCode.NODE_FAILED) for c in checks if not c.ok]
    return max(failed) if failed else 0
