"""Credentials from environment variables named in ``vertexai.yml`` (the family's "Vars").

::

    run_config:
      mlflow:
        request_header_provider_params:
          env_vars: [MLFLOW_TRACKING_USERNAME, MLFLOW_TRACKING_PASSWORD]   # basic auth
          # or: env_vars: [MLFLOW_TRACKING_TOKEN]                          # bearer token
"""

from __future__ import annotations

import base64
import os

from kvx_runtime.auth import RequestHeaderProviderWithKedroContext
from kvx_runtime.errors import ConfigError

TOKEN = "MLFLOW_TRACKING_TOKEN"
USERNAME = "MLFLOW_TRACKING_USERNAME"
PASSWORD = "MLFLOW_TRACKING_PASSWORD"


class EnvCredentialsRequestHeaderProvider(RequestHeaderProviderWithKedroContext):
    def __init__(self, params, kedro_context=None) -> None:
        super().__init__(params, kedro_context)
        names = self.params.get("env_vars")
        if isinstance(names, str):
            names = [names]
        if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
            raise ConfigError("run_config.mlflow.request_header_provider_params.env_vars: "
                              "expected a list of environment variable names")
        if set(names) not in ({TOKEN}, {USERNAME, PASSWORD}):
            raise ConfigError(
                "run_config.mlflow.request_header_provider_params.env_vars: name either "
                f"{TOKEN}, or {USERNAME} and {PASSWORD}"
            )
        self.names = names

    def in_context(self) -> bool:
        return True

    def _value(self, name: str) -> str:
        value = os.environ.get(name)
        if not value:
            raise ConfigError(f"{name} is not set in the environment (named in run_config.mlflow)")
        return value

    def request_headers(self) -> dict[str, str]:
        if self.names == [TOKEN]:
            return {"Authorization": f"Bearer {self._value(TOKEN)}"}
        pair = f"{self._value(USERNAME)}:{self._value(PASSWORD)}".encode()
        return {"Authorization": "Basic " + base64.b64encode(pair).decode()}
