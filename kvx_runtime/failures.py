"""What a retry can change: the one rule for storage, MLflow and the orchestrators' APIs.

- **transient** (retry with backoff): HTTP 408/429/5xx, connection resets, timeouts, a body cut
  short by the network, a token endpoint that is down;
- **refused** (never retry; exit 2): the credentials or the permissions are wrong: HTTP 401/403,
  a token endpoint's ``invalid_grant`` (a revoked or deleted key), a credentials file that
  cannot be read, a local permission denied. Only the user can fix these, and retrying them
  only delays the one line that says so;
- everything else is neither: reported as it is, after no retry.
"""

from __future__ import annotations

import errno

__all__ = ["TRANSIENT_HTTP", "http_status", "is_refused", "is_transient", "refused_refresh"]

#: HTTP statuses worth a retry, for every service we call.
TRANSIENT_HTTP = frozenset({408, 429, 500, 502, 503, 504})
#: HTTP statuses that mean "these credentials may not do this".
REFUSED_HTTP = frozenset({401, 403})

#: Local file-system errors that no retry changes: the root cannot hold intermediates as given.
IMPOSSIBLE_PATH_ERRNOS = frozenset({errno.ENOTDIR, errno.EISDIR, errno.EROFS, errno.EACCES, errno.EPERM,
                                    errno.ENAMETOOLONG, errno.ELOOP})


def _is_protocol_error(error: BaseException) -> bool:
    """aiohttp's parser errors (a body shorter than its Content-Length...) carry ``code = 400``
    although no server said 400: they are the network's doing, not an HTTP answer."""
    return type(error).__module__.startswith("aiohttp.http_exceptions")


def http_status(exc: BaseException) -> int | None:
    """The HTTP status a server answered, behind ``exc``: gcsfs errors carry it as ``code``,
    aiohttp's as ``status``, botocore's in their response (s3fs raises them as the ``__cause__``
    of an OSError)."""
    for error in (exc, exc.__cause__):
        if error is None or _is_protocol_error(error):
            continue
        code = getattr(error, "code", None) or getattr(error, "status", None)
        if isinstance(code, int) and 100 <= code <= 599:
            return code
        response = getattr(error, "response", None)
        if isinstance(response, dict):
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if isinstance(status, int):
                return status
    return None


def refused_refresh(exc: BaseException) -> BaseException | None:
    """google-auth's token refresh that failed for good (``invalid_grant``, a deleted key...),
    behind ``exc`` (gcsfs re-raises it as a 401 "Invalid Credentials" caused by it), or None."""
    return next((error for error in (exc, exc.__cause__) if error is not None and _refresh_refused(error)), None)


def _refresh_refused(exc: BaseException) -> bool:
    """google-auth says so itself: a RefreshError is ``retryable`` only for 5xx/429-like answers."""
    if type(exc).__name__ != "RefreshError" or not type(exc).__module__.startswith("google.auth"):
        return False
    retryable = getattr(exc, "retryable", None)
    if retryable is not None:
        return not retryable
    return "invalid_grant" in str(exc) or "invalid_client" in str(exc)


def is_refused(exc: BaseException) -> bool:
    """Did the service (or the file system) refuse these credentials or this principal?"""
    for error in (exc, exc.__cause__):
        if error is None:
            continue
        if isinstance(error, PermissionError) or _refresh_refused(error):
            return True
        if type(error).__name__ in {"DefaultCredentialsError", "MalformedError"} \
                and type(error).__module__.startswith("google.auth"):
            return True
        # gcsfs answers 403 with a bare OSError("Forbidden: <path>...").
        if type(error) is OSError and str(error).startswith("Forbidden:"):
            return True
    return http_status(exc) in REFUSED_HTTP


def is_transient(exc: BaseException) -> bool:
    """Is ``exc`` worth retrying? Network trouble and throttling/server errors are."""
    from kvx_runtime.errors import KvxError

    if isinstance(exc, KvxError) or is_refused(exc):
        return False
    if isinstance(exc, (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError)):
        return False
    code = http_status(exc)
    if code is not None:
        return code in TRANSIENT_HTTP
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    module = type(exc).__module__
    # aiohttp client and payload errors, google-auth transport errors, requests' connection
    # errors, botocore's connection and read-timeout errors (s3fs).
    if module.startswith(("aiohttp", "google.auth", "requests", "urllib3", "botocore", "aiobotocore")):
        return True
    return isinstance(exc, OSError) and exc.errno is None and "timeout" in str(exc).lower()
