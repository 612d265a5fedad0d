"""The bridge MLflow sees: one request header provider class, registered through the
``mlflow.request_header_provider`` entry point, that delegates to the provider kvx-runtime
installed for this process (and does nothing when none is installed).
"""

from __future__ import annotations

import functools
from typing import Any

from mlflow.tracking.request_header.abstract_request_header_provider import RequestHeaderProvider

from kvx_runtime.log import get_logger

log = get_logger(__name__)


class KvxRequestHeaderProvider(RequestHeaderProvider):
    def in_context(self) -> bool:
        from kvx_runtime.auth import active_provider

        provider = active_provider()
        return bool(provider is not None and provider.in_context())

    def request_headers(self) -> dict[str, str]:
        from kvx_runtime.auth import active_provider

        provider = active_provider()
        if provider is None:
            return {}
        try:
            return provider.headers()
        except Exception as exc:
            # MLflow would swallow this into a generic warning; say what failed (never a token).
            log.error("could not obtain MLflow auth headers", provider=type(provider).__name__,
                      error=f"{type(exc).__name__}: {str(exc)[:300]}")
            raise


_PATCHED = False


def retry_once_after_401() -> None:
    """Wrap MLflow's REST call so that a 401 drops cached tokens and retries once.

    A token can be rejected before its ``exp`` (revoked, rotated key, clock skew); the retry
    gets a fresh one. Installed once per process; a no-op while no provider is active.
    """
    global _PATCHED
    if _PATCHED:
        return
    from mlflow.utils import rest_utils

    original = rest_utils.http_request

    @functools.wraps(original)
    def http_request(*args: Any, **kwargs: Any) -> Any:
        from kvx_runtime.auth import active_provider

        response = original(*args, **kwargs)
        provider = active_provider()
        if getattr(response, "status_code", None) == 401 and provider is not None:
            log.info("MLflow answered 401: refreshing the auth token and retrying once")
            provider.invalidate()
            response = original(*args, **kwargs)
        return response

    rest_utils.http_request = http_request
    _PATCHED = True
