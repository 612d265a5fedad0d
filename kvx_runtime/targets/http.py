"""JSON over HTTP for the targets' REST APIs: retries, one-line errors, no secrets.

429, 5xx and connection errors are retried with backoff (tenacity), other 4xx never; a 401
gets one more try after the caller's ``on_unauthorized`` (a token refresh). An API error is
one line with the service's status and message: exit 2 for 4xx, exit 3 after retries.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

from kvx_runtime import settings
from kvx_runtime.errors import ConfigError, InfrastructureError, KvxError
from kvx_runtime.failures import TRANSIENT_HTTP
from kvx_runtime.log import get_logger

__all__ = ["ApiError", "answered", "checked_api_url", "create_once", "parse_time", "request_json", "session_with"]

log = get_logger(__name__)

_TIME = re.compile(r"^(\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2})(?:\.(\d+))?(Z|[+-]\d{2}:\d{2})?$")


def parse_time(text: str | None) -> datetime | None:
    """An RFC 3339 time from the API (any number of fractional digits)."""
    match = _TIME.match(text or "")
    if not match:
        return None
    base, fraction, zone = match.groups()
    fraction = f".{(fraction + '000000')[:6]}" if fraction else ""
    return datetime.fromisoformat(base + fraction + ("+00:00" if zone in (None, "Z") else zone))


def checked_api_url(host: str, *, service: str, example: str, config_hint: str, credentials_hint: str) -> str:
    """``host`` (a service's API base URL from the config) as an http(s) URL with a host name and
    a valid port, without a trailing slash; else a ConfigError that never echoes credentials."""
    if not host:
        raise ConfigError(f"{service} needs host: the API's URL ({example})", hint=config_hint)
    try:
        parts = urlsplit(host.strip())
        parts.port  # noqa: B018  (raises on a port that is not a number in range)
        valid = parts.scheme in {"http", "https"} and bool(parts.hostname) and " " not in host.strip()
    except ValueError:
        valid = False
        parts = None
    if parts is not None and (parts.username or parts.password):
        # Never echo it: the part before "@" may be a password.
        raise ConfigError("host must not hold credentials (user:password@)", hint=credentials_hint)
    if not valid or parts is None:
        raise ConfigError(f"host {host[:100]!r} is not an http(s) URL", hint=f"e.g. {example}")
    if parts.query or parts.fragment:
        raise ConfigError(f"host {host[:100]!r} has a query or fragment: give the API's base URL",
                          hint=f"e.g. {example}")
    return host.strip().rstrip("/")


def session_with(auth: Any) -> Any:
    """A ``requests`` session that sends ``auth`` (a ``requests`` auth) with every request."""
    import requests

    session = requests.Session()
    session.auth = auth
    return session


class ApiError(KvxError):
    """A pipeline service refused a request (exit 2), or kept failing (exit 3)."""

    def __init__(self, message: str, *, status: int = 0, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        #: The HTTP status behind the error (0: none, e.g. a connection or URL problem).
        self.status = status


def create_once(what: str, post: Callable[[], Any], find: Callable[[], Any | None], *, attempts: int) -> Any:
    """Create ``what`` with ``post`` (one try each), never twice, for an API that takes no
    request id: after a lost answer (or a 409, the echo of an earlier try that did create it)
    ``find`` looks for what an earlier try made before ``post`` is sent again."""
    import time

    for attempt in range(1, attempts + 1):
        try:
            return post()
        except ApiError as exc:
            lost = exc.exit_code == InfrastructureError.exit_code
            if not lost and exc.status != 409:
                raise
            if lost:  # a server still at work (a gateway's 504, our timeout) shows the result later
                time.sleep(min(30.0, settings.API_RETRY_WAIT.get() * 2 ** (attempt - 1)))
            found = find()
            if found is not None:
                log.warning(f"the answer to the {what}'s creation was lost; the {what} exists" if lost
                            else f"the {what} exists already (made by an earlier try); using it")
                return found
            if not lost or attempt == attempts:
                raise
    raise AssertionError("unreachable")  # pragma: no cover


def answered(payload: Mapping[str, Any], name: str, service: str, what: str) -> str:
    """The field ``name`` of an API's answer to ``what``; an answer without it is an ApiError
    (a host that is not the API, or another version of it), never a KeyError."""
    value = payload.get(name)
    if value in (None, ""):
        raise ApiError(f"{service}: the answer to {what} has no {name}", hint="check that the host is the API's URL")
    return str(value)


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
        detail = payload.get("detail")  # FastAPI's (Airflow 3): a string, or an object with a reason
        if isinstance(detail, str) and detail:
            return detail[:300]
        if isinstance(detail, dict):
            return str(detail.get("reason") or detail.get("message") or detail)[:300]
        if isinstance(detail, list):  # pydantic's validation errors
            return "; ".join(f"{'.'.join(map(str, item.get('loc', [])))}: {item.get('msg', '')}"
                             for item in detail if isinstance(item, dict))[:300] or fallback
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
    unauthorized: tuple[int, ...] = (401,),
) -> Any:
    """``method url`` through ``session`` (a requests-like session); returns the JSON answer.

    Redirects are not followed: an API answers, a login proxy redirects (a session that ended),
    which counts as a 401. A status in ``unauthorized`` (401; Airflow also answers an expired or
    foreign JWT with 403) gets one more try after ``on_unauthorized``. A success that is not JSON
    (an HTML page: the host is not the API) is an error, never an empty answer.
    """
    from tenacity import Retrying, retry_if_exception_type, wait_random_exponential

    where = urlsplit(url).netloc.rpartition("@")[2] or "the service"  # never user:password@
    refreshed = False
    made = 0

    def attempt() -> Any:
        nonlocal refreshed, made
        import requests

        made += 1
        options: dict[str, Any] = {"params": params, "headers": {"Accept": "application/json"},
                                   "allow_redirects": False}
        try:
            if files is not None:
                response = session.request(method, url, data=data, files=files, timeout=300, **options)
            else:
                response = session.request(method, url, json=body, timeout=60, **options)
        except requests.exceptions.SSLError:
            raise ApiError(f"{service}: TLS handshake with {where} failed", status=0,
                           hint="check the host's certificate (REQUESTS_CA_BUNDLE for a private CA)") from None
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise _Transient(0, f"{type(exc).__name__} ({where})") from None
        except (requests.exceptions.InvalidURL, requests.exceptions.MissingSchema,
                requests.exceptions.InvalidSchema) as exc:
            raise ApiError(f"{service}: {url.split('?')[0][:120]} is not a usable URL ({type(exc).__name__})",
                           status=0) from None
        except KvxError:
            raise
        except Exception as exc:  # google-auth refreshing a token, for example
            if type(exc).__module__.startswith("google.auth"):
                from kvx_runtime.failures import is_refused

                reason = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
                if is_refused(exc):  # a revoked grant, a deleted key: no retry makes them good
                    raise ApiError(f"{service}: the credentials were refused: {reason}", status=401,
                                   hint="renew them (gcloud auth application-default login, or a new key)"
                                   ) from None
                if type(exc).__name__ == "TransportError":  # the metadata server or the token endpoint, briefly
                    raise _Transient(0, f"could not get credentials: {reason}") from None
                raise InfrastructureError(f"{service}: could not get credentials: {reason}") from None
            raise
        status = response.status_code
        if 300 <= status < 400:  # a login proxy sending us to its login page
            status = 401
        parsed = True
        try:
            payload = response.json() if response.content else {}
        except ValueError:
            payload, parsed = None, False
        if status in unauthorized and on_unauthorized is not None and not refreshed:
            refreshed = True  # a token that expired early, a revoked token, an ended session: one fresh try
            on_unauthorized()
            raise _Transient(401, "unauthorized")
        if status in TRANSIENT_HTTP:
            raise _Transient(status, status_message(payload, f"HTTP {status}"))
        if status >= 400:
            message = status_message(payload, f"HTTP {response.status_code}")
            if status == 404:
                raise ApiError(f"{service}: not found ({what}): {message}", status=status)
            if status in (401, 403):
                raise ApiError(f"{service} refused {what}: {message}", status=status,
                               hint="check the credentials (and that they may use this API)")
            raise ApiError(f"{service} refused {what}: {message}", status=status)
        if not parsed:
            kind = response.headers.get("Content-Type", "no content type").split(";")[0]
            raise ApiError(f"{service}: {where} answered {what} with {kind}, not the API's JSON", status=status,
                           hint="check that the host is the API's URL")
        if payload is not None and not isinstance(payload, dict):  # every answer of these APIs is an object
            raise ApiError(f"{service}: {where} answered {what} with a JSON {type(payload).__name__}, not the "
                           "API's object", status=status, hint="check that the host is the API's URL")
        return {} if payload is None else payload  # JSON null: an answer without a body (Airflow's 201s)

    pause = settings.API_RETRY_WAIT.get() if wait is None else wait
    # The one try after a credential refresh comes on top of the attempts, never instead of them.
    retrying = Retrying(stop=lambda state: state.attempt_number >= attempts + (1 if refreshed else 0),
                        wait=wait_random_exponential(multiplier=pause, max=30),
                        retry=retry_if_exception_type(_Transient), reraise=True)
    try:
        return retrying(attempt)
    except _Transient as exc:
        error = ApiError(f"{service} did not answer {what} after {made} attempts: "
                         f"{exc.status or 'connection'}: {exc}", status=exc.status)
        error.exit_code = InfrastructureError.exit_code
        raise error from None
