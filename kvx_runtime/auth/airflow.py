"""Credentials for Airflow's REST API, chosen from the environment, first match wins:

1. ``KVX_AIRFLOW_TOKEN``: a bearer token as is (a JWT Airflow issued, or a proxy's token);
2. ``KVX_AIRFLOW_USERNAME`` and ``KVX_AIRFLOW_PASSWORD``: Airflow 3's own login: a JWT from
   ``POST <host>/auth/token`` (the simple auth manager and FAB issue one), fetched again when it
   is about to expire or is refused; on Airflow 2 (API v1), HTTP Basic authentication (its
   ``basic_auth`` API backend);
3. Cloud Composer (a host under ``composer.googleusercontent.com``, or ``KVX_AIRFLOW_AUTH=google``):
   a Google access token (scope cloud-platform) from Application Default Credentials;
4. none (``KVX_AIRFLOW_AUTH=none`` forces it: an Airflow behind a proxy that authenticates).

Each is a ``requests`` auth; no token or password is ever logged or put in an error message.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from kvx_runtime import settings
from kvx_runtime.auth.kfp import BearerTokenAuth, KfpAuth, NoAuth
from kvx_runtime.auth.tokens import TokenCache
from kvx_runtime.errors import ConfigError, InfrastructureError
from kvx_runtime.log import register_secrets

__all__ = ["AirflowPasswordAuth", "GoogleAccessTokenAuth", "airflow_auth_from_environment"]

TOKEN_VARIABLE = settings.AIRFLOW_TOKEN.name
USERNAME_VARIABLE = settings.AIRFLOW_USERNAME.name
PASSWORD_VARIABLE = settings.AIRFLOW_PASSWORD.name
MODE_VARIABLE = settings.AIRFLOW_AUTH.name
#: Cloud Composer's Airflow web servers live under this domain.
COMPOSER_DOMAIN = ".composer.googleusercontent.com"
CLOUD_PLATFORM = "https://www.googleapis.com/auth/cloud-platform"


class _NoTokenEndpoint(Exception):
    """The host has no ``/auth/token``: an Airflow 2 web server."""


class AirflowPasswordAuth(KfpAuth):
    """Airflow 3's JWT for a user and password (``POST /auth/token``), cached until shortly
    before its ``exp`` and dropped on a 401; on Airflow 2, the user and password themselves
    (HTTP Basic) once :meth:`for_airflow_2` was called."""

    mode = "Airflow login"

    def __init__(self, host: str, username: str, password: str) -> None:
        register_secrets([password])
        self.host = host.rstrip("/")
        self.username = username
        self._password = password
        self._cache = TokenCache()
        self._basic: str | None = None

    def for_airflow_2(self) -> str:
        """The server is Airflow 2: its API has no token endpoint and takes HTTP Basic. Returns
        the header's value."""
        import base64

        if self._basic is None:
            encoded = base64.b64encode(f"{self.username}:{self._password}".encode()).decode()
            register_secrets([encoded])
            self._basic = f"Basic {encoded}"
        return self._basic

    def headers(self) -> dict[str, str]:
        if self._basic is not None:
            return {"Authorization": self._basic}
        try:
            return {"Authorization": f"Bearer {self._cache.get(self.username, self._login)}"}
        except _NoTokenEndpoint:  # Airflow 2 (asked even for its version, before the API is known)
            return {"Authorization": self.for_airflow_2()}

    def invalidate(self) -> None:
        self._cache.clear()

    def _login(self) -> str:
        import requests

        from kvx_runtime.targets.http import ApiError, request_json

        try:
            answer = request_json(requests.Session(), "POST", f"{self.host}/auth/token", service="Airflow",
                                  what="POST /auth/token (login)",
                                  body={"username": self.username, "password": self._password},
                                  attempts=settings.API_ATTEMPTS.get())
        except ApiError as exc:
            if exc.status in (404, 405):
                raise _NoTokenEndpoint from None
            if exc.status in (400, 401, 403, 422):
                raise ConfigError(f"Airflow refused the login of {self.username!r} (HTTP {exc.status})",
                                  hint=f"check {USERNAME_VARIABLE} and {PASSWORD_VARIABLE}") from None
            raise
        token = answer.get("access_token") if isinstance(answer, dict) else None
        if not isinstance(token, str) or not token:
            raise InfrastructureError(f"Airflow login at {urlsplit(self.host).netloc} answered without an access "
                                      "token (is host the Airflow 3 API server's URL?)")
        return token


class GoogleAccessTokenAuth(KfpAuth):
    """Cloud Composer: a Google OAuth access token of Application Default Credentials."""

    mode = "Google credentials"

    def __init__(self) -> None:
        self._credentials: Any = None

    def headers(self) -> dict[str, str]:
        import google.auth
        from google.auth.exceptions import DefaultCredentialsError, GoogleAuthError
        from google.auth.transport.requests import Request

        try:
            if self._credentials is None:
                self._credentials, _ = google.auth.default(scopes=[CLOUD_PLATFORM])
            if not self._credentials.valid:
                self._credentials.refresh(Request())
        except DefaultCredentialsError as exc:
            raise ConfigError("no Google credentials for Cloud Composer: " + str(exc).splitlines()[0][:200],
                              hint="run `gcloud auth application-default login`, or set "
                              "GOOGLE_APPLICATION_CREDENTIALS") from None
        except GoogleAuthError as exc:
            first = str(exc).splitlines()[0][:200] if str(exc) else ""
            raise InfrastructureError(f"could not get a Google access token: {type(exc).__name__}: {first}") from None
        token = str(self._credentials.token)
        register_secrets([token])
        return {"Authorization": f"Bearer {token}"}

    def invalidate(self) -> None:
        self._credentials = None


def airflow_auth_from_environment(host: str) -> KfpAuth:
    """The auth mode the environment configures (see the module docstring for the order)."""
    forced = settings.AIRFLOW_AUTH.get()
    token = settings.AIRFLOW_TOKEN.get()
    username, password = settings.AIRFLOW_USERNAME.get(), settings.AIRFLOW_PASSWORD.get()
    if forced == "none":
        return NoAuth()
    if token and forced in ("", "token"):
        if any(ch.isspace() for ch in token):  # never sendable as a header; never echoed
            raise ConfigError(f"{TOKEN_VARIABLE} holds whitespace: it is not a bearer token")
        return BearerTokenAuth(token)
    if (username or password) and forced in ("", "password"):
        if not (username and password):
            raise ConfigError(f"Airflow login needs both {USERNAME_VARIABLE} and {PASSWORD_VARIABLE}")
        return AirflowPasswordAuth(host, username, password)
    hostname = urlsplit(host).hostname or ""
    if forced == "google" or (not forced and hostname.endswith(COMPOSER_DOMAIN)):
        return GoogleAccessTokenAuth()
    if forced:
        needed = {"token": TOKEN_VARIABLE, "password": f"{USERNAME_VARIABLE} and {PASSWORD_VARIABLE}"}[forced]
        raise ConfigError(f"{MODE_VARIABLE}={forced} but {needed} is not set")
    return NoAuth()
