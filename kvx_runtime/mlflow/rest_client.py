"""MLflow's tracking REST API (``/api/2.0/mlflow``), spoken without importing MLflow.

A step attached to the pipeline's run that needs nothing of MLflow's Python API (see
:mod:`.lean`) reads the run and writes its params, tags and metrics in a few requests; importing
``mlflow`` for them costs more than the step's own work. The client keeps MLflow's client's
behaviour where a step can tell: the same environment variables for credentials, TLS and HTTP
retries (``MLFLOW_TRACKING_TOKEN``, ``MLFLOW_TRACKING_USERNAME``/``PASSWORD``,
``MLFLOW_TRACKING_INSECURE_TLS``, ``MLFLOW_TRACKING_SERVER_CERT_PATH``,
``MLFLOW_TRACKING_CLIENT_CERT_PATH``, ``MLFLOW_HTTP_REQUEST_*``), the headers of the request
header provider kvx-runtime installed (a 401 drops its tokens and retries once), errors worded
as MLflow's (``INVALID_PARAMETER_VALUE: ...``, ``... failed with error code 401 != 200``), and a
tag write that lost a concurrent insert is written again (:mod:`.concurrent_tags`).
"""

from __future__ import annotations

import base64
import json
import os
import ssl
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from typing import Any

from kvx_runtime.log import get_logger

__all__ = ["MlflowRestClient", "MlflowRestError"]

log = get_logger(__name__)

#: Statuses MLflow's client retries (urllib3's ``status_forcelist`` in ``mlflow.utils.rest_utils``).
_RETRIED_STATUSES = frozenset({429, 500, 502, 503, 504})
#: MLflow's own limits on one ``log-batch`` request.
BATCH_PARAMS = 100
BATCH_TAGS = 100
BATCH_METRICS = 1000


class MlflowRestError(Exception):
    """A request the tracking server refused or never answered (``status`` None)."""

    def __init__(self, message: str, *, status: int | None = None, error_code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.error_code = error_code


def _float_variable(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, "") or default)
    except ValueError:
        return default


class MlflowRestClient:
    """The few tracking calls a step makes, against ``tracking_uri`` (``http(s)://host[/prefix]``)."""

    def __init__(self, tracking_uri: str) -> None:
        self.tracking_uri = tracking_uri.rstrip("/")
        self._base = f"{self.tracking_uri}/api/2.0/mlflow/"
        self._context = self._tls_context()

    @staticmethod
    def _tls_context() -> ssl.SSLContext | None:
        if os.environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() == "true":
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        elif os.environ.get("MLFLOW_TRACKING_SERVER_CERT_PATH"):
            context = ssl.create_default_context(cafile=os.environ["MLFLOW_TRACKING_SERVER_CERT_PATH"])
        else:
            context = None
        client_cert = os.environ.get("MLFLOW_TRACKING_CLIENT_CERT_PATH")
        if client_cert:
            context = context or ssl.create_default_context()
            context.load_cert_chain(client_cert)
        return context

    # -- the calls ---------------------------------------------------------------------------

    def get_run(self, run_id: str) -> dict[str, Any]:
        """The run as the API returns it (``{"info": ..., "data": ..., "inputs": ...}``)."""
        answer = self._request("GET", "runs/get", query={"run_id": run_id})
        run = answer.get("run")
        if not isinstance(run, dict):
            raise MlflowRestError(f"API request to endpoint runs/get returned no run: {str(answer)[:200]}")
        return run

    def log_batch(self, run_id: str, *, metrics: Sequence[Mapping[str, Any]] = (),
                  params: Sequence[Mapping[str, str]] = (), tags: Sequence[Mapping[str, str]] = ()) -> None:
        """Write params, tags and metrics (``{"key", "value"[, "timestamp", "step"]}``) in as few
        requests as MLflow's limits allow."""
        metrics, params, tags = list(metrics), list(params), list(tags)
        while metrics or params or tags:
            body: dict[str, Any] = {"run_id": run_id, "metrics": metrics[:BATCH_METRICS],
                                    "params": params[:BATCH_PARAMS], "tags": tags[:BATCH_TAGS]}
            metrics, params, tags = metrics[BATCH_METRICS:], params[BATCH_PARAMS:], tags[BATCH_TAGS:]
            self._retrying_a_lost_insert_race(lambda body=body: self._request("POST", "runs/log-batch", body=body))

    def set_tag(self, run_id: str, key: str, value: str) -> None:
        body = {"run_id": run_id, "key": key, "value": value}
        self._retrying_a_lost_insert_race(lambda: self._request("POST", "runs/set-tag", body=body))

    # -- the transport -----------------------------------------------------------------------

    @staticmethod
    def _retrying_a_lost_insert_race(call: Any) -> None:
        from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_random

        from kvx_runtime.mlflow.concurrent_tags import ATTEMPTS, is_unique_key_race

        Retrying(stop=stop_after_attempt(ATTEMPTS), wait=wait_random(0.05, 0.5),
                 retry=retry_if_exception(is_unique_key_race), reraise=True)(call)

    def _headers(self) -> dict[str, str]:
        from kvx_runtime.auth import active_provider

        headers = {"User-Agent": "kvx-runtime", "Content-Type": "application/json"}
        username, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
        token = os.environ.get("MLFLOW_TRACKING_TOKEN")
        if username and password:
            pair = base64.standard_b64encode(f"{username}:{password}".encode()).decode()
            headers["Authorization"] = f"Basic {pair}"
        elif token:
            headers["Authorization"] = f"Bearer {token}"
        provider = active_provider()
        if provider is not None and provider.in_context():
            headers.update(provider.request_headers())
        return headers

    def _request(self, method: str, endpoint: str, *, query: Mapping[str, str] | None = None,
                 body: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """One call, with MLflow's retries (connection errors and 429/5xx, exponential
        backoff) and, after a 401 from a server the installed provider signs for, one more
        try with fresh tokens."""
        from kvx_runtime.auth import active_provider

        try:
            return self._with_retries(method, endpoint, query, body)
        except MlflowRestError as exc:
            provider = active_provider()
            if exc.status != 401 or provider is None:
                raise
            log.info("the MLflow server refused the token (401): fetching a new one and retrying once")
            provider.invalidate()
            return self._with_retries(method, endpoint, query, body)

    def _with_retries(self, method: str, endpoint: str, query: Mapping[str, str] | None,
                      body: Mapping[str, Any] | None) -> dict[str, Any]:
        from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_exponential

        retries = int(_float_variable("MLFLOW_HTTP_REQUEST_MAX_RETRIES", 7))
        backoff = _float_variable("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", 2)
        retrying = Retrying(stop=stop_after_attempt(retries + 1),
                            wait=wait_exponential(multiplier=backoff, max=120),
                            retry=retry_if_exception(_retried), reraise=True)
        return retrying(lambda: self._once(method, endpoint, query, body))

    def _once(self, method: str, endpoint: str, query: Mapping[str, str] | None,
              body: Mapping[str, Any] | None) -> dict[str, Any]:
        url = self._base + endpoint + (f"?{urllib.parse.urlencode(query)}" if query else "")
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(url, data=data, method=method, headers=self._headers())
        timeout = _float_variable("MLFLOW_HTTP_REQUEST_TIMEOUT", 120)
        try:
            with urllib.request.urlopen(request, timeout=timeout, context=self._context) as response:
                text = response.read().decode("utf-8", "replace")
        except urllib.error.HTTPError as exc:
            raise _refused(endpoint, exc) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise MlflowRestError(f"API request to {self._base}{endpoint} failed: Max retries exceeded "
                                  f"({type(reason).__name__}: {reason})") from exc
        try:
            answer = json.loads(text) if text.strip() else {}
        except json.JSONDecodeError:
            raise MlflowRestError(f"API request to endpoint {endpoint} did not answer JSON: {text[:200]!r}") from None
        return answer if isinstance(answer, dict) else {}


def _refused(endpoint: str, exc: urllib.error.HTTPError) -> MlflowRestError:
    """The server's refusal worded as MLflow's client words it."""
    try:
        text = exc.read().decode("utf-8", "replace")
    except OSError:
        text = ""
    try:
        answer = json.loads(text)
    except json.JSONDecodeError:
        answer = None
    if isinstance(answer, dict) and "error_code" in answer:
        return MlflowRestError(f"{answer['error_code']}: {answer.get('message', '')}", status=exc.code,
                               error_code=str(answer["error_code"]))
    return MlflowRestError(f"API request to endpoint {endpoint} failed with error code {exc.code} != 200. "
                           f"Response body: '{text[:300]}'", status=exc.code)


def _retried(exc: BaseException) -> bool:
    return isinstance(exc, MlflowRestError) and (exc.status is None or exc.status in _RETRIED_STATUSES)
