"""JSON over HTTP for the targets' REST APIs: retries, one-line errors, no secrets.

429, 5xx and connection errors are retried with backoff (tenacity), other 4xx never; a 401
gets one more try after the caller's ``on_unauthorized`` (a token refresh). An API error is
one line with the service's status and message: exit 2 for 4xx, exit 3 after retries.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

from kvx_runtime.errors import InfrastructureError, KvxError

__all__ = ["ApiError", "parse_time", "request_json"]

_TIME = re.compile(r"^(\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2})(?:\.(\d+))?(Z|[+-]\d{2}:\d{2})?$")


def parse_time(text: str | None) -> datetime | None:
    """An RFC 3339 time from the API (any number of fractional digits)."""
    match = _TIME.match(text or "")
    if not match:
        return None
    base, fraction, zone = match.groups()
    fraction = f".{(fraction + '000000')[:6]}" if fraction else ""
    return datetime.fromisoformat(base + fraction + ("+00:00" if zone in (None, "Z") else zone))


RETRIED_STATUSES = frozenset({408, 429, 500, 502, 503, 504})


class ApiError(KvxError):
    """A pipeline service refused a request (exit 2), or kept failing (exit 3)."""


class _Transient(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def status_message(payload: Any, fallback: str) -> str:
    """The service's own words: Google's ``{"error": {...}}``, grpc-gateway's ``{"code", "message"}``."""
    if isinstance(payload, dict):
        error = payload.get("error")
        if isinstance(error, dict):
            return f"{error.get('status') or error.get('code')}: {error.get('message', '')}".strip()
        if isinstance(error, str) and error:
            return error[:300]
        if payload.get("message"):
            return f"{payload.get('code', '')}: {payload['message']}".strip(": ")[:300]
    return fallback


def request_json(
    session: Any,
    method: str,
    url: str,
    *,
    service: str,
    what: str,
    params: Mapping[str, Any] | None = None,
    body: Any = None,
    data: Any = None,
    files: Any = None,
    attempts: int = 6,
    wait: float | None = None,
    on_unauthorized: Callable[[], None] | None = None,
) -> Any:
    """``method url`` through ``session`` (a requests-like session); returns the JSON answer."""
    from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_random_exponential

    refreshed = False

    def attempt() -> Any:
        nonlocal refreshed
        import requests

        try:
            if files is not None:
                response = session.request(method, url, params=params, data=data, files=files, timeout=300)
            else:
                response = session.request(method, url, params=params, json=body, timeout=60)
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise _Transient(0, f"{type(exc).__name__}") from None
        except KvxError:
            raise
        except Exception as exc:  # google-auth refreshing a token, for example
            if type(exc).__module__.startswith("google.auth"):
                raise InfrastructureError(f"{service}: could not get credentials: {type(exc).__name__}: "
                                          f"{str(exc).splitlines()[0][:200] if str(exc) else ''}") from None
            raise
        try:
            payload = response.json() if response.content else {}
        except ValueError:
            payload = {}
        if response.status_code == 401 and on_unauthorized is not None and not refreshed:
            refreshed = True  # a token that expired early or was revoked: one fresh try
            on_unauthorized()
            raise _Transient(401, "unauthorized")
        if response.status_code in RETRIED_STATUSES:
            raise _Transient(response.status_code, status_message(payload, f"HTTP {response.status_code}"))
        if response.status_code >= 400:
            message = status_message(payload, f"HTTP {response.status_code}")
            if response.status_code == 404:
                raise ApiError(f"{service}: not found ({what}): {message}")
            if response.status_code in (401, 403):
                raise ApiError(f"{service} refused {what}: {message}",
                               hint="check the credentials (and that they may use this API)")
            raise ApiError(f"{service} refused {what}: {message}")
        return payload

    pause = float(os.environ.get("KVX_API_RETRY_WAIT", "1")) if wait is None else wait
    retrying = Retrying(stop=stop_after_attempt(attempts + 1 if on_unauthorized else attempts),
                        wait=wait_random_exponential(multiplier=pause, max=30),
                        retry=retry_if_exception_type(_Transient), reraise=True)
    try:
        return retrying(attempt)
    except _Transient as exc:
        error = ApiError(f"{service} did not answer {what} after {attempts} attempts: "
                         f"{exc.status or 'connection'}: {exc}")
        error.exit_code = InfrastructureError.exit_code  # type: ignore[assignment]
        raise error from None
