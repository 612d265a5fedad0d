"""Authentication to the MLflow tracking server, configured in ``vertexai.yml``.

``run_config.mlflow.request_header_provider_params`` (and optionally ``cls``) choose a
request header provider; kvx-runtime installs it in every step, in ``mlflow-start`` and in
``mlflow-end`` through MLflow's ``mlflow.request_header_provider`` entry point, so the
project's ``settings.py`` needs no change. Built in (chosen from the params when ``cls`` is
not given):

- ``service_account`` + ``client_id``: Google IAM (:class:`~.gcp.MLFlowGoogleIAMRequestHeaderProvider`);
- ``client_id`` (or ``GOOGLE_AUDIENCE``): Google OAuth ID token (:class:`~.gcp.MLFlowGoogleOAuthRequestHeaderProvider`);
- ``env_vars``: credentials from named environment variables (:class:`~.env.EnvCredentialsRequestHeaderProvider`).

A custom provider subclasses :class:`RequestHeaderProviderWithKedroContext`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from kvx_runtime.auth.tokens import TokenCache
from kvx_runtime.errors import ConfigError
from kvx_runtime.log import get_logger

__all__ = [
    "RequestHeaderProviderWithKedroContext",
    "active_provider",
    "build_request_header_provider",
    "install_request_header_provider",
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

    def __init__(self, params: dict[str, Any], kedro_context: Any = None) -> None:
        self.params = dict(params)
        self.kedro_context = kedro_context
        self.tokens = TokenCache()

    @abstractmethod
    def in_context(self) -> bool:
        """Whether this provider applies (usually: whether its params are present)."""

    @abstractmethod
    def request_headers(self) -> dict[str, str]:
        """Headers for the next request to the tracking server."""

    def invalidate(self) -> None:
        """Forget cached tokens (the server said 401)."""
        self.tokens.clear()


_ACTIVE: RequestHeaderProviderWithKedroContext | None = None


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
        return None
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
    provider = build_request_header_provider(
        mlflow_config.cls, dict(mlflow_config.request_header_provider_params), kedro_context
    )
    _ACTIVE = provider
    if provider is None:
        return False
    from kvx_runtime.auth import mlflow_provider

    mlflow_provider.retry_once_after_401()
    log.info("MLflow request header provider installed", provider=type(provider).__name__)
    return True


def uninstall_request_header_provider() -> None:
    global _ACTIVE
    _ACTIVE = None
