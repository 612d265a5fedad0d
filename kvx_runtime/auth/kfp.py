"""Credentials for the Kubeflow Pipelines API, in the modes the plugin family's users have.

Chosen from the environment, first match wins:

1. ``KF_PIPELINES_TOKEN`` (or ``KVX_KFP_TOKEN``): a bearer token as is;
2. ``IAP_CLIENT_ID``: KFP behind Google's Identity-Aware Proxy: a Google ID token for that
   audience (a service-account key in GOOGLE_APPLICATION_CREDENTIALS or the metadata server,
   via google-auth; gcloud user credentials cannot mint one);
3. ``DEX_USERNAME`` and ``DEX_PASSWORD``: KFP behind Dex (static password) and
   oidc-authservice or oauth2-proxy: the login form flow, ending with the session cookie
   (``authservice_session``; ``oauth2_proxy_kubeflow`` on Kubeflow >= 1.9);
4. in a cluster: the projected service-account token at ``KF_PIPELINES_SA_TOKEN_PATH``
   (default ``/var/run/secrets/kubeflow/pipelines/token``), re-read for every request since
   the kubelet rotates it;
5. none (a KFP without auth, e.g. port-forwarded).

Each is a ``requests`` auth (applied to every request); tokens are cached until shortly
before they expire and dropped on a 401 (:meth:`KfpAuth.invalidate`). No token, cookie or
password is ever logged or put in an error message.
"""

from __future__ import annotations

import os
import re
from abc import ABC, abstractmethod
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

from kvx_runtime import settings
from kvx_runtime.auth.tokens import TokenCache
from kvx_runtime.errors import ConfigError, InfrastructureError
from kvx_runtime.log import register_secrets

__all__ = [
    "BearerTokenAuth",
    "DexAuth",
    "IapAuth",
    "KfpAuth",
    "ServiceAccountTokenAuth",
    "kfp_auth_from_environment",
]

DEFAULT_SA_TOKEN_PATH = "/var/run/secrets/kubeflow/pipelines/token"
SESSION_COOKIES = ("authservice_session", "oauth2_proxy_kubeflow")


class KfpAuth(ABC):
    """Adds credentials to each request (a ``requests`` auth callable)."""

    #: How the mode is named in messages (never the credential).
    mode: str = "none"

    def __call__(self, request: Any) -> Any:
        for name, value in self.headers().items():
            request.headers[name] = value
        return request

    @abstractmethod
    def headers(self) -> dict[str, str]:
        """Headers carrying the credential, fetched or refreshed as needed."""

    def invalidate(self) -> None:  # noqa: B027  (modes without a cache have nothing to forget)
        """Forget cached credentials (after a 401): the next request fetches fresh ones."""


class BearerTokenAuth(KfpAuth):
    mode = "bearer token"

    def __init__(self, token: str) -> None:
        register_secrets([token])
        self._token = token

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._token}"}


class IapAuth(KfpAuth):
    mode = "Google IAP"

    def __init__(self, client_id: str) -> None:
        self.client_id = client_id
        self._cache = TokenCache()

    def headers(self) -> dict[str, str]:
        from kvx_runtime.auth.gcp import fetch_oauth_id_token

        token = self._cache.get(self.client_id, lambda: fetch_oauth_id_token(self.client_id))
        return {"Authorization": f"Bearer {token}"}

    def invalidate(self) -> None:
        self._cache.clear()


class ServiceAccountTokenAuth(KfpAuth):
    mode = "service-account token"

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def headers(self) -> dict[str, str]:
        try:
            token = self.path.read_text().strip()
        except OSError as exc:
            raise ConfigError(f"cannot read the service-account token {self.path}: {exc.strerror}",
                              hint="mount it (serviceAccountToken volume, audience pipelines.kubeflow.org) or "
                              "set KF_PIPELINES_SA_TOKEN_PATH") from None
        register_secrets([token])
        return {"Authorization": f"Bearer {token}"}


class _LoginForm(HTMLParser):
    """The login form's action and hidden fields (Dex's CSRF field on newer releases)."""

    def __init__(self) -> None:
        super().__init__()
        self.action: str | None = None
        self.hidden: dict[str, str] = {}
        self.links: list[str] = []
        self._in_form = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {k: v or "" for k, v in attrs}
        if tag == "form" and self.action is None:
            self.action = values.get("action", "")
            self._in_form = True
        elif tag == "input" and self._in_form and values.get("type") == "hidden" and values.get("name"):
            self.hidden[values["name"]] = values.get("value", "")
        elif tag == "a" and values.get("href"):
            self.links.append(values["href"])

    def handle_endtag(self, tag: str) -> None:
        if tag == "form":
            self._in_form = False


class DexAuth(KfpAuth):
    """Dex static-password login through the cluster's auth proxy; the session cookie is
    reused until a 401, then the login runs again."""

    mode = "Dex"

    def __init__(self, host: str, username: str, password: str, *, session_factory: Any = None) -> None:
        register_secrets([password])
        self.host = host.rstrip("/")
        self.username = username
        self._password = password
        self._cookie: str | None = None
        self._session_factory = session_factory

    def headers(self) -> dict[str, str]:
        if self._cookie is None:
            cookies = self._login()
            register_secrets(cookies.values())
            self._cookie = "; ".join(f"{name}={value}" for name, value in cookies.items())
        return {"Cookie": self._cookie}

    def invalidate(self) -> None:
        self._cookie = None

    def _login(self) -> dict[str, str]:
        """Log in; returns the session cookie(s) to send."""
        import requests

        session = self._session_factory() if self._session_factory else requests.Session()
        parts = urlsplit(self.host)
        origin = f"{parts.scheme}://{parts.netloc}"
        try:
            page = session.get(self.host, allow_redirects=True, timeout=30)
            if page.status_code in (401, 403) and "/auth/" not in page.url:  # oauth2-proxy
                page = session.get(f"{origin}/oauth2/start", params={"rd": parts.path or "/"}, timeout=30)
            form = _LoginForm()
            form.feed(page.text)
            if "/auth/local" not in page.url:  # Dex's connector choice: take the static-password one
                local = next((link for link in form.links if "/auth/local" in link), None)
                if local is None:
                    raise ConfigError(f"Dex login: {self.host} did not lead to Dex's password login form",
                                      hint="point host at the cluster's /pipeline URL behind Dex")
                page = session.get(urljoin(page.url, local), timeout=30)
                form = _LoginForm()
                form.feed(page.text)
            action = urljoin(page.url, form.action) if form.action else page.url
            answer = session.post(action, data={**form.hidden, "login": self.username, "password": self._password},
                                  allow_redirects=True, timeout=30)
            if "/approval" in answer.url:  # a Dex that asks to approve the client
                approval = _LoginForm()
                approval.feed(answer.text)
                session.post(urljoin(answer.url, approval.action or answer.url),
                             data={**approval.hidden, "approval": "approve"}, allow_redirects=True, timeout=30)
        except requests.RequestException as exc:
            raise InfrastructureError(f"Dex login at {origin} failed: {type(exc).__name__}") from None
        cookies = _session_cookies(session.cookies)
        if cookies:
            return cookies
        if re.search(r"(?i)invalid|incorrect", answer.text or ""):
            raise ConfigError(f"Dex refused the login of {self.username!r}",
                              hint="check DEX_USERNAME and DEX_PASSWORD (a static-password user)")
        raise ConfigError(f"Dex login as {self.username!r} ended without a session cookie "
                          f"({' or '.join(SESSION_COOKIES)})", hint="is host the cluster's URL behind Dex?")


def _session_cookies(jar: Any) -> dict[str, str]:
    """The auth proxy's session cookie; oauth2-proxy splits one over 4 KB into ``<name>_0``,
    ``<name>_1``... and needs every part back (in order)."""
    cookies = {cookie.name: str(cookie.value) for cookie in jar if cookie.value}
    for name in SESSION_COOKIES:
        if name in cookies:
            return {name: cookies[name]}
        parts = sorted((int(key.rpartition("_")[2]), key) for key in cookies
                       if re.fullmatch(rf"{re.escape(name)}_\d+", key))
        if parts:
            return {key: cookies[key] for _, key in parts}
    return {}


class NoAuth(KfpAuth):
    def headers(self) -> dict[str, str]:
        return {}


def kfp_auth_from_environment(host: str) -> KfpAuth:
    """The auth mode the environment configures (see the module docstring for the order)."""
    token = (os.environ.get("KF_PIPELINES_TOKEN") or settings.KFP_TOKEN.get() or "").strip()
    if token:
        if any(ch.isspace() for ch in token):  # never sendable as a header; never echoed
            raise ConfigError("KF_PIPELINES_TOKEN (or KVX_KFP_TOKEN) holds whitespace: it is not a bearer token")
        return BearerTokenAuth(token)
    client_id = os.environ.get("IAP_CLIENT_ID")
    if client_id:
        return IapAuth(client_id)
    username, password = os.environ.get("DEX_USERNAME"), os.environ.get("DEX_PASSWORD")
    if username or password:
        if not (username and password):
            raise ConfigError("Dex login needs both DEX_USERNAME and DEX_PASSWORD")
        return DexAuth(host, username, password)
    path = os.environ.get("KF_PIPELINES_SA_TOKEN_PATH")
    if path or Path(DEFAULT_SA_TOKEN_PATH).is_file():
        return ServiceAccountTokenAuth(path or DEFAULT_SA_TOKEN_PATH)
    return NoAuth()
