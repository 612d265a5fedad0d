"""Authentication to the MLflow tracking server, configured in ``vertexai.yml``.

``run_config.mlflow.request_header_provider_params`` (and optionally ``cls``) choose a
request header provider; kvx-runtime installs it in every step, in ``mlflow-start`` and in
``mlflow-end`` through MLflow's ``mlflow.request_header_provider`` entry point, so the
project's ``settings.py`` needs no change. Built in (chosen from the params when ``cls`` is
not given):

- ``service_account`` + ``client_id``: Google IAM (:class:`~.gcp.MLFlowGoogleIAMRequestHeaderProvider`);
- ``client_id`` (or ``GOOGLE_AUDIENCE``): Google OAuth ID token (:class:`~.gcp.MLFlowGoogleOAuthRequestHeaderProvider`);
- ``env_vars``: credentials from named environment variables (:class:`~.env.EnvCredentialsRequestHeaderProvider`).

Without a configured provider, a Google ID token handed to the step with its audience
(``MLFLOW_TRACKING_TOKEN`` and ``KVX_MLFLOW_TOKEN_AUDIENCE``: Airflow's GoogleOAuth2
authentication) is renewed from the step's own credentials before it expires
(:class:`~.gcp.HandedGoogleIdTokenProvider`).

A custom provider subclasses :class:`RequestHeaderProviderWithKedroContext`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from kvx_runtime.auth.tokens import TokenCache
from kvx_runtime.errors import ConfigError, InfrastructureError, KvxError
from kvx_runtime.log import get_logger

__all__ = [
    "RequestHeaderProviderWithKedroContext",
    "active_provider",
    "build_request_header_provider",
    "install_request_header_provider",
    "unauthenticated_because",
]

log = get_logger(__name__)

_ALIASES = {
    "kedro_vertexai.auth.gcp.MLFlowGoogleIAMRequestHeaderProvider": (
        "kvx_runtime.auth.gcp.MLFlowGoogleIAMRequestHeaderProvider"
    ),
    "kedro_vertexai.auth.gcp.MLFlowGoogleOAuthCredentialsProvider": (
        "kvx_runtime.auth.gcp.MLFlowGoogleOAuthRequestHeaderProvider"
    ),
    "kedro_vertexai.auth.gcp.MLFlowGoogleOAuthRequestHeaderProvider": (
        "kvx_runtime.auth.gcp.MLFlowGoogleOAuthRequestHeaderProvider"
    ),
}


class RequestHeaderProviderWithKedroContext(ABC):
    """Base of request header providers configured from ``vertexai.yml``.

    ``self.params`` is ``run_config.mlflow.request_header_provider_params``;
    ``self.kedro_context`` the step's Kedro context (credentials, config loader...).
    Tokens should be cached with ``self.tokens`` (see :class:`~.tokens.TokenCache`); after a
    401 from the server, :meth:`invalidate` is called and the request retried once.
    """

    #: Why :meth:`headers` failed the last time, or None (see :func:`unauthenticated_because`).
    failure: Exception | None = None

    def __init__(self, params: dict[str, Any], kedro_context: Any = None) -> None:
        self.params = dict(params)
        self.kedro_context = kedro_context
        self.tokens = TokenCache()
        self.failure = None

    def headers(self) -> dict[str, str]:
        """:meth:`request_headers`, remembering why it failed: MLflow's client swallows a
        provider's exception and sends the request without the headers, and the 401 that
        follows says nothing of the cause."""
        try:
            headers = self.request_headers()
        except Exception as exc:
            self.failure = exc
            raise
        self.failure = None
        return headers

    @abstractmethod
    def in_context(self) -> bool:
        """Whether this provider applies (usually: whether its params are present)."""

    @abstractmethod
    def request_headers(self) -> dict[str, str]:
        """Headers for the next request to the tracking server."""

    def invalidate(self) -> None:
        """Forget cached tokens (the server said 401)."""
        self.tokens.clear()

    def activate(self) -> None:
        """Called once the provider serves this process's MLflow requests (installed)."""
        return None

    def release(self) -> None:
        """Undo what :meth:`activate` changed in the process (called when it is uninstalled)."""
        return None


_ACTIVE: RequestHeaderProviderWithKedroContext | None = None
#: The import hook that patches MLflow's REST calls once MLflow is imported (see below).
_PATCH_WAITING: Any = None


def active_provider() -> RequestHeaderProviderWithKedroContext | None:
    return _ACTIVE


def _infer_class(params: dict[str, Any]) -> str | None:
    if "service_account" in params and "client_id" in params:
        return "kvx_runtime.auth.gcp.MLFlowGoogleIAMRequestHeaderProvider"
    if "client_id" in params or "audience" in params:
        return "kvx_runtime.auth.gcp.MLFlowGoogleOAuthRequestHeaderProvider"
    if "env_vars" in params:
        return "kvx_runtime.auth.env.EnvCredentialsRequestHeaderProvider"
    return None


def build_request_header_provider(
    cls_path: str | None, params: dict[str, Any], kedro_context: Any = None
) -> RequestHeaderProviderWithKedroContext | None:
    """The configured provider, or None when nothing is configured."""
    from kvx_runtime.dynamic_config import import_object

    chosen = cls_path or _infer_class(params)
    if chosen is None:
        if params:
            raise ConfigError(
                "run_config.mlflow.request_header_provider_params: cannot tell which auth mode "
                f"these keys mean ({', '.join(sorted(params))})",
                hint="set run_config.mlflow.cls, or use client_id / service_account / env_vars",
            )
        from kvx_runtime.auth.gcp import handed_token_provider

        return handed_token_provider(kedro_context)
    cls = import_object(_ALIASES.get(chosen, chosen), what="run_config.mlflow.cls")
    if not (isinstance(cls, type) and issubclass(cls, RequestHeaderProviderWithKedroContext)):
        raise ConfigError(
            f"run_config.mlflow.cls: {chosen} is not a subclass of "
            "kvx_runtime.auth.RequestHeaderProviderWithKedroContext"
        )
    return cls(params, kedro_context)


def install_request_header_provider(mlflow_config: Any, kedro_context: Any = None) -> bool:
    """Activate the provider configured in ``run_config.mlflow`` for this process."""
    global _ACTIVE
    uninstall_request_header_provider()  # what the one before took from the process comes back first
    provider = build_request_header_provider(
        mlflow_config.cls, dict(mlflow_config.request_header_provider_params), kedro_context
    )
    _ACTIVE = provider
    if provider is None:
        return False
    provider.activate()
    _retry_once_after_401_in_mlflow()
    log.info("MLflow request header provider installed", provider=type(provider).__name__)
    return True


def unauthenticated_because(doing: str) -> KvxError | None:
    """The installed provider's last failure as the reason of a 401 met while ``doing``, or None
    when its headers were made: the request went without them because of it."""
    failure = _ACTIVE.failure if _ACTIVE is not None else None
    if failure is None:
        return None
    if isinstance(failure, KvxError):
        return type(failure)(f"{doing}: the request had no credentials: {failure.message}", hint=failure.hint)
    text = str(failure).strip().splitlines()
    return InfrastructureError(f"{doing}: the request had no credentials: {type(_ACTIVE).__name__} failed: "
                               f"{type(failure).__name__}: {text[0][:300] if text else ''}")


def _retry_once_after_401_in_mlflow() -> None:
    """Patch MLflow's REST calls now, or when MLflow is imported: a step talking to MLflow over
    its REST API (``kvx_runtime.mlflow.lean``) never imports it for authentication."""
    import sys

    from kvx_runtime.lazy_imports import after_import

    def patch(_module: Any = None) -> None:
        from kvx_runtime.auth import mlflow_provider

        mlflow_provider.retry_once_after_401()

    global _PATCH_WAITING
    if "mlflow" in sys.modules:
        patch()
    elif _PATCH_WAITING is None or _PATCH_WAITING not in sys.meta_path:
        _PATCH_WAITING = after_import("mlflow", patch)


def uninstall_request_header_provider() -> None:
    global _ACTIVE
    provider, _ACTIVE = _ACTIVE, None
    if provider is not None:
        provider.release()
