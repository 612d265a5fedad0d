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
"""

from __future__ import annotations

import os
from typing import Any

from kvx_runtime.auth import RequestHeaderProviderWithKedroContext
from kvx_runtime.dynamic_config import DynamicConfigProvider
from kvx_runtime.errors import ConfigError, InfrastructureError

__all__ = [
    "MLFlowGoogleIAMCredentialsProvider",
    "MLFlowGoogleIAMRequestHeaderProvider",
    "MLFlowGoogleOAuthCredentialsProvider",
    "MLFlowGoogleOAuthRequestHeaderProvider",
    "fetch_iam_id_token",
    "fetch_oauth_id_token",
]

IAM_ENDPOINT = "https://iamcredentials.googleapis.com"
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


class _TokenCredentialsProvider(DynamicConfigProvider):
    """Writes ``gcp_credentials: {MLFLOW_TRACKING_TOKEN: <token>}`` into credentials.yml."""

    @property
    def target_config_file(self) -> str:
        return "credentials.yml"

    def _token(self) -> str:
        raise NotImplementedError

    def generate_config(self) -> dict[str, Any]:
        return {"gcp_credentials": {"MLFLOW_TRACKING_TOKEN": self._token()}}


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
