"""What gs:// roots need beyond fsspec: credentials that fail loudly, and gcsfs's own request
retries kept inside the blob store's give-up budget.

- gcsfs tries ``GOOGLE_APPLICATION_CREDENTIALS`` and, when that file cannot be read or parsed,
  silently falls back to anonymous access: on real Cloud Storage every request then fails with
  401 and nothing names the bad file. :func:`check_credentials_file` says so at once (exit 2).
- gcsfs retries each request itself (6 tries, up to ~35 s of backoff) and treats a refused token
  refresh (``invalid_grant``: a revoked key) as retryable. :func:`install_request_retry_policy`
  wraps gcsfs's retry predicate: a refusal is never retried, and no retry starts whose backoff
  would end past the deadline of the blob operation under way (:func:`operation_deadline`).
  The deadline is a context variable: fsspec runs gcsfs's requests in its own event loop's
  thread, in tasks that copy the context of the thread that asked, so each request sees the
  deadline of its own operation, and a step's heartbeat (another thread) neither sees nor
  changes the step's.
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from kvx_runtime import settings
from kvx_runtime.errors import ConfigError
from kvx_runtime.failures import http_status, is_refused, refused_refresh

__all__ = ["check_credentials_file", "install_request_retry_policy", "operation_deadline"]

CREDENTIALS_ENV = "GOOGLE_APPLICATION_CREDENTIALS"
#: gcsfs's backoff before its n-th retry is at most ``2 ** (n - 1) + 1`` seconds, capped at 32.
_GCSFS_MAX_SLEEP = 32.0

#: The ``time.monotonic()`` deadline of the blob operation under way in this context.
_deadline: ContextVar[float | None] = ContextVar("kvx_gcs_operation_deadline", default=None)
_lock = threading.Lock()
#: Failed tries per asyncio task (gcsfs's retry loop for one request runs in one task).
_failures: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()
_installed = False


def check_credentials_file() -> None:
    """``GOOGLE_APPLICATION_CREDENTIALS``, when set, names a credentials file google-auth can load.

    No network: the file is parsed, not used. The message names the file, never its content.
    """
    path = os.environ.get(CREDENTIALS_ENV)
    if not path:
        return
    import google.auth
    import google.auth.exceptions

    try:
        google.auth.load_credentials_from_file(path)
    except google.auth.exceptions.GoogleAuthError as exc:
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        if not os.path.exists(path):
            reason = "no such file"
        elif not os.access(path, os.R_OK):
            reason = "not readable by this process"
        raise ConfigError(
            f"{CREDENTIALS_ENV} ({path}) is not a usable Google credentials file: {reason}",
            hint="point it to a service-account key or an authorized-user file, or unset it to use the "
            "metadata server (on Google Cloud)",
        ) from None


@contextmanager
def operation_deadline(deadline: float) -> Iterator[None]:
    """gcsfs's request retries under this ``time.monotonic()`` deadline (one blob operation of
    this thread; see the module docstring)."""
    token = _deadline.set(deadline)
    try:
        yield
    finally:
        _deadline.reset(token)


def _next_sleep_bound(failures: int) -> float:
    return min(2.0 ** max(failures - 1, 0) + 1.0, _GCSFS_MAX_SLEEP)


def _within_budget() -> bool:
    """Would gcsfs's next backoff still end before the deadline? Counted per asyncio task."""
    import asyncio

    deadline = _deadline.get()
    if deadline is None:
        return True
    try:
        task: Any = asyncio.current_task()
    except RuntimeError:
        task = None
    failures = 1
    if task is not None:
        with _lock:
            failures = _failures.get(task, 0) + 1
            _failures[task] = failures
    return time.monotonic() + _next_sleep_bound(failures) < deadline


def bound_stalled_requests() -> None:
    """Give every GCS request of this process (the blob store's, the Kedro datasets') a limit on
    connecting and on waiting for its next bytes (``KVX_STORAGE_STALL_TIMEOUT``): gcsfs sets
    none, so a half-open connection held a step until the orchestrator's own timeout. A slow
    transfer that keeps moving is never cut; a stalled one fails, and is retried within the
    budget. A project's own ``requests_timeout`` (fsspec's config) wins."""
    import aiohttp
    import fsspec.config

    limit = settings.STORAGE_STALL_TIMEOUT.get()
    defaults = fsspec.config.conf.setdefault("gcs", {})
    if "requests_timeout" not in defaults and "requests_timeout" not in fsspec.config.conf.get("gs", {}):
        defaults["requests_timeout"] = aiohttp.ClientTimeout(total=None, sock_connect=limit, sock_read=limit)


def install_request_retry_policy() -> None:
    """Wrap gcsfs's retry predicate once per process (see the module docstring)."""
    global _installed
    if _installed:
        return
    import gcsfs.retry

    original = gcsfs.retry.is_retriable

    def is_retriable(exception: BaseException) -> bool:
        # A 401 may be a token that expired in flight: gcsfs's retries (with a refreshed token)
        # stay; a refused refresh (which gcsfs re-raises as a 401) or a 403 is final.
        if refused_refresh(exception) is not None or (is_refused(exception) and http_status(exception) != 401):
            return False
        return bool(original(exception)) and _within_budget()

    # gcsfs's retry decorator looks the predicate up in its module at each failure.
    gcsfs.retry.is_retriable = is_retriable
    _installed = True
