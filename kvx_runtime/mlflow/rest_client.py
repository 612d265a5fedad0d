"""MLflow's tracking REST API (``/api/2.0/mlflow``), spoken without importing MLflow.

A step attached to the pipeline's run that needs nothing of MLflow's Python API (see
:mod:`.lean`) reads the run and writes its params, tags and metrics in a few requests; importing
``mlflow`` for them costs more than the step's own work. The client talks HTTP as MLflow's own
client does (``mlflow.utils.request_utils``): through ``requests`` with urllib3's retries (all
methods, connection errors and 429/5xx, ``Retry-After`` honoured, redirects followed with their
body), ``requests``' handling of proxies and CA bundles (``HTTPS_PROXY``, ``NO_PROXY``,
``REQUESTS_CA_BUNDLE``), and MLflow's variables for credentials, TLS and retries
(``MLFLOW_TRACKING_TOKEN``, ``MLFLOW_TRACKING_USERNAME``/``PASSWORD``,
``MLFLOW_TRACKING_INSECURE_TLS``, ``MLFLOW_TRACKING_SERVER_CERT_PATH``,
``MLFLOW_TRACKING_CLIENT_CERT_PATH``, ``MLFLOW_HTTP_REQUEST_*``). The headers of the request
header provider kvx-runtime installed come first and the credentials' ``Authorization`` wins,
as in MLflow; a 401 drops the provider's tokens and retries once. Errors are worded as MLflow's
(``INVALID_PARAMETER_VALUE: ...``, ``... failed with error code 401 != 200``), and a tag write
that lost a concurrent insert is written again (:mod:`.concurrent_tags`).
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

from kvx_runtime.log import get_logger

__all__ = ["MlflowRestClient", "MlflowRestError", "mlflow_flag"]

log = get_logger(__name__)

#: Statuses MLflow's client retries (``_TRANSIENT_FAILURE_RESPONSE_CODES``).
_RETRIED_STATUSES = (429, 500, 502, 503, 504)
#: MLflow's own limits on one ``log-batch`` request.
BATCH_PARAMS = 100
BATCH_TAGS = 100
BATCH_METRICS = 1000
#: MLflow's defaults for its ``MLFLOW_HTTP_REQUEST_*`` variables.
_MLFLOWS_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": 7, "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": 2,
                  "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": 1.0, "MLFLOW_HTTP_REQUEST_TIMEOUT": 120}


def mlflow_flag(name: str, default: bool = False) -> bool:
    """A boolean MLflow variable as MLflow reads it (``true`` or ``1``, any case)."""
    value = os.environ.get(name)
    return default if value is None or not value.strip() else value.strip().lower() in ("true", "1")


def _number(name: str) -> float:
    try:
        return float(os.environ.get(name, "") or _MLFLOWS_DEFAULTS[name])
    except ValueError:
        return float(_MLFLOWS_DEFAULTS[name])


class MlflowRestError(Exception):
    """A request the tracking server refused or never answered (``status`` None)."""

    def __init__(self, message: str, *, status: int | None = None, error_code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.error_code = error_code


class MlflowRestClient:
    """The few tracking calls a step makes, against ``tracking_uri`` (``http(s)://host[/prefix]``)."""

    def __init__(self, tracking_uri: str) -> None:
        self.tracking_uri = tracking_uri.rstrip("/")
        self._base = f"{self.tracking_uri}/api/2.0/mlflow/"
        self._session: Any = None

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

    def _http(self) -> Any:
        """A ``requests`` session retrying as MLflow's does (``_get_request_session``)."""
        if self._session is None:
            import requests
            from requests.adapters import HTTPAdapter
            from urllib3.util.retry import Retry

            retries = int(_number("MLFLOW_HTTP_REQUEST_MAX_RETRIES"))
            retry = Retry(total=retries, connect=retries, read=retries, redirect=retries, status=retries,
                          status_forcelist=_RETRIED_STATUSES, allowed_methods=None, raise_on_status=False,
                          backoff_factor=_number("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"),
                          backoff_jitter=_number("MLFLOW_HTTP_REQUEST_BACKOFF_JITTER"),
                          respect_retry_after_header=mlflow_flag("MLFLOW_HTTP_RESPECT_RETRY_AFTER_HEADER", True))
            session = requests.Session()
            for scheme in ("http://", "https://"):
                session.mount(scheme, HTTPAdapter(max_retries=retry))
            self._session = session
        return self._session

    @staticmethod
    def _headers() -> dict[str, str]:
        """The installed provider's headers, then the credentials' ``Authorization`` (MLflow's order)."""
        from kvx_runtime.auth import active_provider

        headers = {"User-Agent": "kvx-runtime", "Content-Type": "application/json"}
        provider = active_provider()
        if provider is not None and provider.in_context():
            headers.update(provider.headers())
        username, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
        token = os.environ.get("MLFLOW_TRACKING_TOKEN")
        if username and password:
            pair = base64.standard_b64encode(f"{username}:{password}".encode()).decode()
            headers["Authorization"] = f"Basic {pair}"
        elif token:
            headers["Authorization"] = f"Bearer {token}"
        return headers

    def _request(self, method: str, endpoint: str, *, query: Mapping[str, str] | None = None,
                 body: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """One call (retried by the session); after a 401 from a server the installed provider
        signs for, one more with fresh tokens."""
        from kvx_runtime.auth import active_provider

        try:
            return self._once(method, endpoint, query, body)
        except MlflowRestError as exc:
            provider = active_provider()
            if exc.status != 401 or provider is None:
                raise
            log.info("the MLflow server refused the token (401): fetching a new one and retrying once")
            provider.invalidate()
            return self._once(method, endpoint, query, body)

    def _once(self, method: str, endpoint: str, query: Mapping[str, str] | None,
              body: Mapping[str, Any] | None) -> dict[str, Any]:
        import requests

        insecure = mlflow_flag("MLFLOW_TRACKING_INSECURE_TLS")
        try:
            response = self._http().request(
                method, self._base + endpoint, params=query, data=json.dumps(body) if body is not None else None,
                headers=self._headers(), timeout=_number("MLFLOW_HTTP_REQUEST_TIMEOUT"),
                verify=False if insecure else (os.environ.get("MLFLOW_TRACKING_SERVER_CERT_PATH") or True),
                cert=os.environ.get("MLFLOW_TRACKING_CLIENT_CERT_PATH") or None)
        except requests.exceptions.SSLError as exc:
            raise MlflowRestError(f"API request to {self._base}{endpoint} failed: the server's TLS certificate "
                                  f"was not accepted ({_first_line(exc)})") from exc
        except requests.exceptions.RequestException as exc:  # connection, timeout, too many retries
            raise MlflowRestError(f"API request to {self._base}{endpoint} failed with exception "
                                  f"{_first_line(exc)}") from exc
        if response.status_code != 200:
            raise _refused(endpoint, response.status_code, response.text)
        try:
            answer = response.json() if response.text.strip() else {}
        except ValueError:
            raise MlflowRestError(f"API request to endpoint {endpoint} did not answer JSON: "
                                  f"{response.text[:200]!r}") from None
        return answer if isinstance(answer, dict) else {}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def _refused(endpoint: str, status: int, text: str) -> MlflowRestError:
    """The server's refusal worded as MLflow's client words it."""
    try:
        answer = json.loads(text)
    except json.JSONDecodeError:
        answer = None
    if isinstance(answer, dict) and "error_code" in answer:
        return MlflowRestError(f"{answer['error_code']}: {answer.get('message', '')}", status=status,
                               error_code=str(answer["error_code"]))
    return MlflowRestError(f"API request to endpoint {endpoint} failed with error code {status} != 200. "
                           f"Response body: '{text[:300]}'", status=status)
