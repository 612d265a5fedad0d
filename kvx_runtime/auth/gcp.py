"""Google identity for MLflow behind Identity-Aware Proxy (or any ID-token check).

Two ways to get an ID token whose audience is the proxy's OAuth client id:

- **OAuth** (``client_id``, or ``GOOGLE_AUDIENCE``): google-auth's ``fetch_id_token`` from the
  environment: a service-account key in ``GOOGLE_APPLICATION_CREDENTIALS``, or the metadata
  server of the Vertex AI machine.
- **IAM** (``service_account`` + ``client_id``): the IAM Credentials ``generateIdToken`` REST
  method for that service account, called with the step's default credentials through
  google-auth's ``AuthorizedSession`` (the caller needs ``roles/iam.serviceAccountTokenCreator``
  on it). ``iam_endpoint`` overrides the API base URL (private endpoints).

Tokens are cached until shortly before they expire. The same two modes are available as
dynamic config providers that write ``gcp_credentials.MLFLOW_TRACKING_TOKEN`` into
``credentials.yml`` (for kedro-mlflow's ``server.credentials: gcp_credentials``).

A token handed to the step (Airflow's ``run_config.authentication: {type: GoogleOAuth2}``: the
worker mints it into ``MLFLOW_TRACKING_TOKEN`` and names its audience in
``KVX_MLFLOW_TOKEN_AUDIENCE``) is used while it is valid, then replaced by tokens the step mints
itself (:class:`HandedGoogleIdTokenProvider`): an ID token lasts an hour, a step may not.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

from kvx_runtime import settings
from kvx_runtime.auth import RequestHeaderProviderWithKedroContext
from kvx_runtime.auth.env import TOKEN as TOKEN_VARIABLE  # MLflow's bearer token: the handed one arrives there
from kvx_runtime.auth.tokens import jwt_expiry, jwt_issued_at, reuse_until
from kvx_runtime.dynamic_config import DynamicConfigProvider
from kvx_runtime.errors import ConfigError, InfrastructureError, KvxError
from kvx_runtime.log import get_logger, register_secrets

__all__ = [
    "HandedGoogleIdTokenProvider",
    "MLFlowGoogleIAMCredentialsProvider",
    "MLFlowGoogleIAMRequestHeaderProvider",
    "MLFlowGoogleOAuthCredentialsProvider",
    "MLFlowGoogleOAuthRequestHeaderProvider",
    "fetch_iam_id_token",
    "fetch_oauth_id_token",
]

log = get_logger(__name__)

IAM_ENDPOINT = "https://iamcredentials.googleapis.com"

#: An expiring handed token is still sent this long before its ``exp`` when no new one can be minted.
_LAST_USE_MARGIN = 5.0
#: Seconds between attempts to mint while the handed token still serves (off Google Cloud each
#: attempt can wait on the metadata server).
_MINT_RETRY_SECONDS = 30.0
_SCOPES = ["https://www.googleapis.com/auth/cloud-platform"]


class GoogleAuthError(InfrastructureError):
    """A Google ID token could not be obtained (exit code 3: usually transient)."""


def _audience(params: dict[str, Any]) -> str:
    audience = params.get("client_id") or params.get("audience") or os.environ.get("GOOGLE_AUDIENCE")
    if not audience:
        raise ConfigError(
            "run_config.mlflow.request_header_provider_params.client_id is required "
            "(or set GOOGLE_AUDIENCE)"
        )
    return str(audience)


def fetch_oauth_id_token(audience: str) -> str:
    """An ID token for ``audience`` from the environment (key file or metadata server)."""
    import google.auth.exceptions
    from google.auth.transport.requests import Request
    from google.oauth2 import id_token

    try:
        return str(id_token.fetch_id_token(Request(), audience))
    except google.auth.exceptions.DefaultCredentialsError as exc:
        key_file = os.environ.get("GOOGLE_APPLICATION_CREDENTIALS")
        if key_file:  # the file is missing, malformed or not a key: fixing it is the user's part
            raise ConfigError(
                f"GOOGLE_APPLICATION_CREDENTIALS ({key_file}) cannot mint an ID token: "
                f"{_first_line(exc)}",
                hint="point it to a service-account key (gcloud user credentials cannot mint ID tokens), "
                "or unset it on Google Cloud to use the metadata server",
            ) from None
        # No key file and no metadata server answered: off Google Cloud, or its metadata server
        # is unreachable for now.
        raise GoogleAuthError(
            "no Google credentials for an ID token: set GOOGLE_APPLICATION_CREDENTIALS to a "
            f"service-account key or run on Google Cloud ({_first_line(exc)})"
        ) from None
    except google.auth.exceptions.GoogleAuthError as exc:
        raise GoogleAuthError(f"could not get a Google ID token: {_first_line(exc)}") from None


def fetch_iam_id_token(service_account: str, audience: str, endpoint: str = IAM_ENDPOINT) -> str:
    """An ID token for ``service_account`` with ``audience`` from IAM Credentials."""
    import google.auth
    import google.auth.exceptions
    from google.auth.transport.requests import AuthorizedSession

    url = f"{endpoint.rstrip('/')}/v1/projects/-/serviceAccounts/{service_account}:generateIdToken"
    try:
        credentials, _ = google.auth.default(scopes=_SCOPES)
        response = AuthorizedSession(credentials).post(
            url, json={"audience": audience, "includeEmail": True}, timeout=30
        )
    except google.auth.exceptions.GoogleAuthError as exc:
        raise GoogleAuthError(f"could not call IAM generateIdToken: {_first_line(exc)}") from None
    except OSError as exc:
        raise GoogleAuthError(f"could not reach IAM Credentials at {endpoint}: {_first_line(exc)}") from None
    if response.status_code != 200:
        raise GoogleAuthError(
            f"IAM generateIdToken for {service_account} failed with HTTP {response.status_code}"
            + (" (does the step's identity have roles/iam.serviceAccountTokenCreator?)"
               if response.status_code == 403 else "")
        )
    token = response.json().get("token")
    if not token:
        raise GoogleAuthError("IAM generateIdToken returned no token")
    return str(token)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


class MLFlowGoogleOAuthRequestHeaderProvider(RequestHeaderProviderWithKedroContext):
    """``Authorization: Bearer <ID token>`` for ``client_id`` from the environment."""

    def in_context(self) -> bool:
        return True

    def request_headers(self) -> dict[str, str]:
        audience = _audience(self.params)
        token = self.tokens.get(audience, lambda: fetch_oauth_id_token(audience))
        return {"Authorization": f"Bearer {token}"}


class MLFlowGoogleIAMRequestHeaderProvider(RequestHeaderProviderWithKedroContext):
    """``Authorization: Bearer <ID token>`` of ``service_account`` for ``client_id``."""

    def in_context(self) -> bool:
        return True

    def request_headers(self) -> dict[str, str]:
        audience = _audience(self.params)
        account = self.params.get("service_account")
        if not account:
            raise ConfigError("run_config.mlflow.request_header_provider_params.service_account is required")
        endpoint = str(self.params.get("iam_endpoint") or IAM_ENDPOINT)
        token = self.tokens.get(
            f"{account}|{audience}", lambda: fetch_iam_id_token(str(account), audience, endpoint)
        )
        return {"Authorization": f"Bearer {token}"}


class HandedGoogleIdTokenProvider(RequestHeaderProviderWithKedroContext):
    """The Google ID token handed to the step in ``MLFLOW_TRACKING_TOKEN`` (minted for it by
    Airflow's worker: ``run_config.authentication: {type: GoogleOAuth2}``) while it is valid,
    then ID tokens for the same audience (``params["audience"]``, from
    ``KVX_MLFLOW_TOKEN_AUDIENCE``) minted from the step's own Google credentials (Workload
    Identity, the metadata server, a key file). A Google ID token lasts an hour: without this a
    step running longer had its MLflow requests refused (401) after the hour.

    The token is taken out of the environment while the provider is installed (:meth:`activate`):
    MLflow sends the environment's token in preference to any provider's headers.
    When the step cannot mint one, the handed token is used until a few seconds before it
    expires, and then the error says why and how to give the step credentials.
    """

    def __init__(self, params: dict[str, Any], kedro_context: Any = None,
                 clock: Callable[[], float] = time.time) -> None:
        super().__init__(params, kedro_context)
        self.audience = str(self.params["audience"])
        self._clock = clock
        self._handed = os.environ.get(TOKEN_VARIABLE) or None
        self._expiry: float | None = None
        self._handed_until = float("inf")
        if self._handed is not None:
            register_secrets([self._handed])
            self._expiry = jwt_expiry(self._handed)
            issued = jwt_issued_at(self._handed)
            if self._expiry is not None:  # not a JWT: nothing says when it ends, used as given
                self._handed_until = reuse_until(issued if issued is not None else clock(), self._expiry)
        self._refused = False  # the tracking server answered 401 to the handed token
        self._sent_handed = False
        self._mint_failed_at: float | None = None
        self._warned = False

    def in_context(self) -> bool:
        return True

    def request_headers(self) -> dict[str, str]:
        now = self._clock()
        self._sent_handed = False  # a 401 to a request this call gives nothing to is no verdict on it
        usable = self._handed is not None and not self._refused
        if usable and now < self._handed_until:
            return self._bearer(self._handed, handed=True)
        # Until a few seconds before its end the handed token is a fallback when minting fails.
        fallback = usable and self._expiry is not None and now < self._expiry - _LAST_USE_MARGIN
        if fallback and self._mint_failed_at is not None and now - self._mint_failed_at < _MINT_RETRY_SECONDS:
            return self._bearer(self._handed, handed=True)  # not a look-up per request while it fails
        try:
            token = self.tokens.get(self.audience, self._mint)
        except (GoogleAuthError, ConfigError) as exc:
            self._mint_failed_at = now
            if not fallback:
                raise self._cannot_renew(exc) from None
            if not self._warned:
                self._warned = True
                assert self._expiry is not None
                log.warning("the MLflow token handed to this step expires soon and the step cannot mint "
                            "another: MLflow requests after it will be refused",
                            expires_in_seconds=round(self._expiry - now), cause=exc.message)
            return self._bearer(self._handed, handed=True)
        self._mint_failed_at = None
        return self._bearer(token, handed=False)

    def _bearer(self, token: str | None, *, handed: bool) -> dict[str, str]:
        self._sent_handed = handed
        return {"Authorization": f"Bearer {token}"}

    def _cannot_renew(self, exc: KvxError) -> KvxError:
        state = ("was refused by the tracking server" if self._refused else "has expired" if self._handed
                 else "is missing")
        message = (f"the MLflow ID token handed to this step ({TOKEN_VARIABLE}, audience {self.audience}) {state} "
                   f"and the step cannot mint another from its own Google credentials: {exc.message}")
        if isinstance(exc, ConfigError):  # a credentials file to fix: no retry helps
            return ConfigError(message, hint=exc.hint)
        return GoogleAuthError(
            message,
            hint="a Google ID token lasts an hour: give the step's pods Google credentials (on GKE and Cloud "
            "Composer: Workload Identity, run_config.service_account bound to a Google service account the "
            "proxy lets in) so that steps renew it, or keep steps that log to MLflow under an hour",
        )

    def invalidate(self) -> None:
        super().invalidate()
        if self._sent_handed:  # refused before its exp (revoked, clock skew): never sent again
            self._refused = True

    def activate(self) -> None:
        if self._handed is not None and os.environ.get(TOKEN_VARIABLE) == self._handed:
            del os.environ[TOKEN_VARIABLE]

    def release(self) -> None:
        if self._handed is not None:
            os.environ.setdefault(TOKEN_VARIABLE, self._handed)

    def _mint(self) -> str:
        return fetch_oauth_id_token(self.audience)


def handed_token_provider(kedro_context: Any = None) -> HandedGoogleIdTokenProvider | None:
    """The provider for a token handed to the step with its audience (``KVX_MLFLOW_TOKEN_AUDIENCE``
    set), else None."""
    audience = settings.MLFLOW_TOKEN_AUDIENCE.get()
    return HandedGoogleIdTokenProvider({"audience": audience}, kedro_context) if audience else None


class _TokenCredentialsProvider(DynamicConfigProvider):
    """Writes ``gcp_credentials: {MLFLOW_TRACKING_TOKEN: <token>}`` into credentials.yml."""

    @property
    def target_config_file(self) -> str:
        return "credentials.yml"

    def _token(self) -> str:
        raise NotImplementedError

    def generate_config(self) -> dict[str, Any]:
        return {"gcp_credentials": {TOKEN_VARIABLE: self._token()}}


class MLFlowGoogleOAuthCredentialsProvider(_TokenCredentialsProvider):
    """Dynamic config provider: an OAuth ID token for ``client_id``."""

    def _token(self) -> str:
        return fetch_oauth_id_token(_audience(self.params))


class MLFlowGoogleIAMCredentialsProvider(_TokenCredentialsProvider):
    """Dynamic config provider: an IAM ID token of ``service_account`` for ``client_id``."""

    def _token(self) -> str:
        account = self.params.get("service_account")
        if not account:
            raise ConfigError("dynamic config provider MLFlowGoogleIAMCredentialsProvider needs service_account")
        endpoint = str(self.params.get("iam_endpoint") or IAM_ENDPOINT)
        return fetch_iam_id_token(str(account), _audience(self.params), endpoint)
