"""Token caching shared by every auth mode: a token is reused until shortly before it expires.

The expiry comes from the token itself when it is a JWT (Google ID tokens are), else from a
conservative default lifetime. Nothing here logs or formats a token.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Callable

from cachetools import TLRUCache

from kvx_runtime.log import register_secrets

#: Refresh this long before ``exp``, so a long request never carries an expired token.
REFRESH_MARGIN = 120.0
#: Lifetime assumed for tokens that do not say when they expire.
DEFAULT_LIFETIME = 300.0


def _jwt_claim(token: str, name: str) -> float | None:
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        padded = parts[1] + "=" * (-len(parts[1]) % 4)
        claims = json.loads(base64.urlsafe_b64decode(padded))
        return float(claims[name])
    except (ValueError, KeyError, TypeError):
        return None


def jwt_expiry(token: str) -> float | None:
    """The ``exp`` claim of a JWT (seconds since the epoch), without verifying it."""
    return _jwt_claim(token, "exp")


def jwt_issued_at(token: str) -> float | None:
    """The ``iat`` claim of a JWT (seconds since the epoch), without verifying it."""
    return _jwt_claim(token, "iat")


def reuse_until(fetched: float, expiry: float | None) -> float:
    """Until when a token fetched at ``fetched`` is reused: ``REFRESH_MARGIN`` before its
    expiry, very short-lived tokens for half their life, tokens that do not say when they
    expire for ``DEFAULT_LIFETIME``."""
    lifetime = (expiry - fetched) if expiry else DEFAULT_LIFETIME
    return fetched + max(lifetime - REFRESH_MARGIN, lifetime / 2, 0.0)


class TokenCache:
    """One cached token per key, each living until ``exp - REFRESH_MARGIN``."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._cache: TLRUCache[str, tuple[str, float]] = TLRUCache(
            maxsize=16, ttu=lambda _key, value, _now: value[1], timer=clock
        )

    def get(self, key: str, fetch: Callable[[], str]) -> str:
        with self._lock:
            cached = self._cache.get(key)
            if cached is not None:
                return cached[0]
            token = fetch()
            register_secrets([token])  # never in a log line, even inside a library's message
            self._cache[key] = (token, reuse_until(self._clock(), jwt_expiry(token)))
            return token

    def clear(self) -> None:
        with self._lock:
            self._cache.clear()
