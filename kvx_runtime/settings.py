"""Every ``KVX_*`` environment variable that tunes kvx-runtime, in one table.

Each :class:`Setting` has its name, kind, default, bounds and one line of documentation; a
module reads a setting with ``SETTING.get()``. An empty or unset variable means the default; a
value that cannot be read, or lies outside the bounds, is a :class:`ConfigError` (exit 2) naming
the variable: never a raw ``ValueError`` ending as an internal error, never a silent default.

Variables that carry data rather than tune behaviour (``KVX_CODE``, ``KVX_SAVE_VERSION``,
``KVX_HOST_ALIASES``, ``KVX_KFP_TOKEN``, ``KVX_S3_*``, ``KVX_MLFLOW_RUN_ID``) are read where
their meaning lives; they are listed here too (kind ``str``), so that this table is the index
of every variable (``tests/test_settings.py`` checks that the code reads no other and that the
docs name them all).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from kvx_runtime.errors import ConfigError

__all__ = ["SETTINGS", "Setting", "environment_variable"]

T = TypeVar("T", int, float, str)

_SHOWN = 40


@dataclass(frozen=True)
class Setting(Generic[T]):
    """One environment variable: ``get()`` returns its typed value or the default."""

    name: str
    kind: type[T]
    default: T
    doc: str
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[str, ...] = ()

    def get(self) -> T:
        text = os.environ.get(self.name, "").strip()
        if not text:
            return self.default
        value = self._parse(text)
        self._check_bounds(text, value)
        return value

    def _parse(self, text: str) -> T:
        shown = text if len(text) <= _SHOWN else text[: _SHOWN - 3] + "..."
        if self.kind is str:
            if self.choices and text.lower() not in self.choices:
                raise ConfigError(f"{self.name}={shown!r} is not one of {', '.join(self.choices)}")
            return text.lower() if self.choices else text  # type: ignore[return-value]
        parse: Callable[[str], Any] = int if self.kind is int else float
        try:
            value = parse(text)
        except ValueError:
            raise ConfigError(f"{self.name}={shown!r} is not {'an integer' if self.kind is int else 'a number'}",
                              hint=self.doc) from None
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{self.name}={shown!r} is not a finite number", hint=self.doc)
        return value

    def _check_bounds(self, text: str, value: Any) -> None:
        if self.kind is str:
            return
        low, high = self.minimum, self.maximum
        if (low is not None and value < low) or (high is not None and value > high):
            bounds = (f"from {low:g} to {high:g}" if low is not None and high is not None
                      else f"at least {low:g}" if low is not None else f"at most {high:g}")
            raise ConfigError(f"{self.name}={text[:_SHOWN]!r} is out of range: {bounds}", hint=self.doc)


# --- the table -----------------------------------------------------------------------------------

# Storage (kvx_runtime.storage)
STORAGE_RETRIES = Setting("KVX_STORAGE_RETRIES", int, 3,
                          "attempts of a whole blob read or write (gcsfs also retries each request)", minimum=1)
STORAGE_RETRY_WAIT = Setting("KVX_STORAGE_RETRY_WAIT", float, 1.0,
                             "first backoff wait in seconds (exponential with jitter, at most 30)", minimum=0)
STORAGE_RETRY_BUDGET = Setting("KVX_STORAGE_RETRY_BUDGET", float, 90.0,
                               "give-up budget in seconds of one blob read or write, request retries included",
                               minimum=0)
STORAGE_STALL_TIMEOUT = Setting("KVX_STORAGE_STALL_TIMEOUT", float, 120.0,
                                "seconds a GCS request may wait to connect, or for its next bytes, before "
                                "it counts as stalled (then retried within the budget)", minimum=1)
STORAGE_BLOCK_SIZE = Setting("KVX_STORAGE_BLOCK_SIZE", int, 16 * 1024 * 1024,
                             "chunk size in bytes of remote uploads and reads (at least 5 MiB on S3)",
                             minimum=256 * 1024)
BLOB_LEVEL = Setting("KVX_BLOB_LEVEL", int, 1, "zstd compression level of new blobs", minimum=1, maximum=19)
#: At most half of gc's shortest deletion age (storage.gc.MIN_DELETE_AGE): a running step's job
#: always holds a record younger than what gc may delete.
HEARTBEAT_INTERVAL = Setting("KVX_HEARTBEAT_INTERVAL", float, 600.0,
                             "seconds between a running step's activity records in its job directory "
                             "(gc keeps a job with a recent one)", minimum=1, maximum=1800)
S3_ENDPOINT_URL = Setting("KVX_S3_ENDPOINT_URL", str, "", "run_config.s3.endpoint_url, compiled into every step")
S3_REGION = Setting("KVX_S3_REGION", str, "", "run_config.s3.region, compiled into every step")

# Logging (kvx_runtime.log)
LOG_FORMAT = Setting("KVX_LOG_FORMAT", str, "", "json or text (default: JSON unless stderr is a terminal)",
                     choices=("json", "text", "console"))
LOG_LEVEL = Setting("KVX_LOG_LEVEL", str, "INFO", "log level", choices=("debug", "info", "warning", "error",
                                                                      "critical"))

# The step (exec-node)
SAVE_VERSION = Setting("KVX_SAVE_VERSION", str, "", "the run's save version when --save-version is absent")
CODE = Setting("KVX_CODE", str, "", "the code archive to run when --code is absent")
CACHE = Setting("KVX_CACHE", str, "", "on or off: the step cache when --cache is absent (default: "
                "run_config.cache.enabled)", choices=("on", "off"))
CODE_CACHE = Setting("KVX_CODE_CACHE", str, "", "where code archives are unpacked (default: <tmp>/kvx-code)")
CODE_MAX_BYTES = Setting("KVX_CODE_MAX_BYTES", int, 200 * 1024 * 1024,
                         "largest code archive accepted, in bytes", minimum=1)
CODE_MAX_UNPACKED_BYTES = Setting("KVX_CODE_MAX_UNPACKED_BYTES", int, 2 * 1024 * 1024 * 1024,
                                  "largest size a code archive may unpack to, in bytes", minimum=1)
ORCHESTRATOR = Setting("KVX_ORCHESTRATOR", str, "",
                       "the orchestrator a step runs under: vertex, kubeflow, airflow or local (default: detected)")
HOST_ALIASES = Setting("KVX_HOST_ALIASES", str, "", "IP=name1,name2;... (run_config.network.host_aliases)")
MLFLOW_RUN_ID = Setting("KVX_MLFLOW_RUN_ID", str, "", "the pipeline's MLflow run, set by exec-node for the step")
MLFLOW_CLIENT = Setting("KVX_MLFLOW_CLIENT", str, "auto",
                        "how a step attached to the pipeline's MLflow run talks to it: auto (MLflow's REST "
                        "API where the step needs nothing more, see docs/mlflow.md) or mlflow (MLflow's client "
                        "and kedro-mlflow's hooks, always)", choices=("auto", "mlflow"))
MLFLOW_TOKEN_AUDIENCE = Setting("KVX_MLFLOW_TOKEN_AUDIENCE", str, "",
                                "the audience of the Google ID token in MLFLOW_TRACKING_TOKEN (Airflow's "
                                "GoogleOAuth2 authentication sets both): the step mints a new one from its own "
                                "Google credentials before it expires")
MLFLOW_CREATE_ATTEMPTS = Setting("KVX_MLFLOW_CREATE_ATTEMPTS", int, 5,
                                 "attempts to create the pipeline's MLflow run", minimum=1)

# Commands that talk to the pipeline services (kvx_runtime.targets, doctor)
API_ATTEMPTS = Setting("KVX_API_ATTEMPTS", int, 6, "attempts of a Kubeflow Pipelines API request", minimum=1)
API_RETRY_WAIT = Setting("KVX_API_RETRY_WAIT", float, 1.0, "first backoff wait in seconds of API retries",
                         minimum=0)
VERTEX_ATTEMPTS = Setting("KVX_VERTEX_ATTEMPTS", int, 6, "attempts of a Vertex AI API request", minimum=1)
VERTEX_RETRY_WAIT = Setting("KVX_VERTEX_RETRY_WAIT", float, 1.0,
                            "first backoff wait in seconds of Vertex AI API retries", minimum=0)
VERTEX_ENDPOINT = Setting("KVX_VERTEX_ENDPOINT", str, "", "Vertex AI API base URL (private endpoints, tests)")
LOGGING_ENDPOINT = Setting("KVX_LOGGING_ENDPOINT", str, "https://logging.googleapis.com",
                           "Cloud Logging API base URL")
KFP_TOKEN = Setting("KVX_KFP_TOKEN", str, "", "a Kubeflow Pipelines bearer token (as KF_PIPELINES_TOKEN)")
WATCH_INTERVAL = Setting("KVX_WATCH_INTERVAL", float, 5.0, "seconds between status polls of --wait",
                         minimum=0.01)
AIRFLOW_TOKEN = Setting("KVX_AIRFLOW_TOKEN", str, "", "a bearer token for Airflow's REST API")
AIRFLOW_USERNAME = Setting("KVX_AIRFLOW_USERNAME", str, "", "an Airflow user, logged in for a JWT (/auth/token)")
AIRFLOW_PASSWORD = Setting("KVX_AIRFLOW_PASSWORD", str, "", "the password of KVX_AIRFLOW_USERNAME")
AIRFLOW_AUTH = Setting("KVX_AIRFLOW_AUTH", str, "", "force how kvx-runtime authenticates to Airflow's API",
                       choices=("token", "password", "google", "none"))
AIRFLOW_PARSE_TIMEOUT = Setting("KVX_AIRFLOW_PARSE_TIMEOUT", float, 600.0,
                                "seconds to wait for Airflow to parse an uploaded DAG file", minimum=1)
INPUT_CHECK_TIMEOUT = Setting("KVX_INPUT_CHECK_TIMEOUT", float, 20.0,
                              "seconds run-once waits to learn whether the pipeline's inputs under a cloud "
                              "storage root are there (unanswered: submitted anyway, with a warning)", minimum=1)
DOCTOR_TIMEOUT = Setting("KVX_DOCTOR_TIMEOUT", float, 3.0,
                         "seconds doctor waits for its network checks (run in parallel)", minimum=1)

#: Every setting, by variable name.
SETTINGS: dict[str, Setting[Any]] = {
    value.name: value for value in list(globals().values()) if isinstance(value, Setting)
}


@contextmanager
def environment_variable(name: str, value: str) -> Iterator[None]:
    """``name`` set to ``value`` inside the block; its earlier value (or absence) restored after."""
    previous = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = previous
