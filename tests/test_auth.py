"""Auth building blocks: token caching by expiry, provider selection, env credentials,
final-status parsing, and redaction of credentials in messages."""

from __future__ import annotations

import base64
import json

import pytest

from kvx_runtime.auth import build_request_header_provider
from kvx_runtime.auth.env import EnvCredentialsRequestHeaderProvider
from kvx_runtime.auth.gcp import MLFlowGoogleIAMRequestHeaderProvider, MLFlowGoogleOAuthRequestHeaderProvider
from kvx_runtime.auth.tokens import REFRESH_MARGIN, TokenCache, jwt_expiry
from kvx_runtime.errors import ConfigError, UsageError
from kvx_runtime.mlflow.pipeline_run import FINAL_STATES, _infrastructure_error, _redact, parse_final_status


def jwt(exp: float) -> str:
    body = base64.urlsafe_b64encode(json.dumps({"exp": exp}).encode()).rstrip(b"=").decode()
    return f"e30.{body}.sig"


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def test_jwt_expiry_is_read_without_verification() -> None:
    assert jwt_expiry(jwt(1234.5)) == 1234.5
    assert jwt_expiry("not-a-jwt") is None
    assert jwt_expiry("a.!!!.c") is None


def test_tokens_are_reused_until_shortly_before_they_expire() -> None:
    clock = Clock()
    cache = TokenCache(clock=clock)
    issued = []

    def fetch() -> str:
        issued.append(jwt(clock.now + 3600))
        return issued[-1]

    first = cache.get("aud", fetch)
    clock.now += 3600 - REFRESH_MARGIN - 1
    assert cache.get("aud", fetch) == first and len(issued) == 1
    clock.now += 2  # inside the refresh margin
    assert cache.get("aud", fetch) != first and len(issued) == 2


def test_short_lived_and_opaque_tokens_are_cached_for_a_while() -> None:
    clock = Clock()
    cache = TokenCache(clock=clock)
    calls = []
    cache.get("short", lambda: calls.append(1) or jwt(clock.now + 10))
    clock.now += 4
    cache.get("short", lambda: calls.append(1) or jwt(clock.now + 10))
    assert len(calls) == 1  # half of its 10 s life
    clock.now += 2
    cache.get("short", lambda: calls.append(1) or jwt(clock.now + 10))
    assert len(calls) == 2
    cache.clear()
    cache.get("short", lambda: calls.append(1) or "opaque")
    assert len(calls) == 3


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({"client_id": "x", "service_account": "sa@p.iam"}, MLFlowGoogleIAMRequestHeaderProvider),
        ({"client_id": "x"}, MLFlowGoogleOAuthRequestHeaderProvider),
        ({"env_vars": ["MLFLOW_TRACKING_TOKEN"]}, EnvCredentialsRequestHeaderProvider),
    ],
)
def test_provider_is_chosen_from_the_params(params: dict, expected: type) -> None:
    assert isinstance(build_request_header_provider(None, params), expected)


def test_no_params_means_no_provider_and_unknown_params_are_an_error() -> None:
    assert build_request_header_provider(None, {}) is None
    with pytest.raises(ConfigError, match="cannot tell which auth mode"):
        build_request_header_provider(None, {"my_auth_info": "YOLO"})
    with pytest.raises(ConfigError, match="not a subclass"):
        build_request_header_provider("builtins.dict", {})


def test_seed_class_paths_are_accepted() -> None:
    provider = build_request_header_provider(
        "kedro_vertexai.auth.gcp.MLFlowGoogleIAMRequestHeaderProvider",
        {"client_id": "x", "service_account": "sa"},
    )
    assert isinstance(provider, MLFlowGoogleIAMRequestHeaderProvider)


def test_env_credentials_give_bearer_or_basic_headers(monkeypatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "tok")
    token = EnvCredentialsRequestHeaderProvider({"env_vars": ["MLFLOW_TRACKING_TOKEN"]})
    assert token.request_headers() == {"Authorization": "Bearer tok"}
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "u")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "p")
    basic = EnvCredentialsRequestHeaderProvider(
        {"env_vars": ["MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"]})
    assert basic.request_headers() == {"Authorization": "Basic " + base64.b64encode(b"u:p").decode()}
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD")
    with pytest.raises(ConfigError, match="MLFLOW_TRACKING_PASSWORD is not set"):
        basic.request_headers()
    with pytest.raises(ConfigError, match="name either"):
        EnvCredentialsRequestHeaderProvider({"env_vars": ["HOME"]})


def test_final_status_parsing_and_mapping() -> None:
    state, message = parse_final_status(json.dumps({"state": "FAILED", "error": {"code": 9, "message": "boom"}}))
    assert (state, message) == ("FAILED", "boom")
    assert parse_final_status('{"state": "succeeded"}') == ("SUCCEEDED", None)
    assert FINAL_STATES["SUCCEEDED"] == "FINISHED" and FINAL_STATES["CANCELLED"] == "KILLED"
    with pytest.raises(UsageError, match="not JSON"):
        parse_final_status("{nope")
    with pytest.raises(UsageError, match='"state"'):
        parse_final_status("[1]")


def test_credentials_in_urls_never_reach_messages() -> None:
    assert _redact("https://user:s3cret@mlflow.example.com/api") == "https://mlflow.example.com/api"
    error = _infrastructure_error("connect", "https://u:pw@host", ConnectionError("Max retries exceeded with url https://u:pw@host/x"))
    assert "pw" not in str(error) and "unreachable" in str(error)
    assert "unauthenticated (401)" in str(_infrastructure_error("connect", None, Exception("HTTP 401 Unauthorized")))


def test_custom_provider_subclass_gets_params_and_kedro_context() -> None:
    from kvx_runtime.auth import RequestHeaderProviderWithKedroContext

    class MyCustomMLflowHeaderProvider(RequestHeaderProviderWithKedroContext):
        def in_context(self) -> bool:
            return "my_auth_info" in self.params

        def request_headers(self) -> dict[str, str]:
            token = self.tokens.get("k", lambda: f"token-for-{self.kedro_context}")
            return {"Authorization": f"Bearer {token}", "X-My-Custom-Header": self.params["my_auth_info"]}

    globals()["MyCustomMLflowHeaderProvider"] = MyCustomMLflowHeaderProvider
    try:
        provider = build_request_header_provider(
            f"{__name__}.MyCustomMLflowHeaderProvider", {"my_auth_info": "YOLO"}, kedro_context="ctx")
        assert provider is not None and provider.in_context()
        assert provider.request_headers() == {"Authorization": "Bearer token-for-ctx", "X-My-Custom-Header": "YOLO"}
    finally:
        del globals()["MyCustomMLflowHeaderProvider"]


@pytest.mark.parametrize("content", [
    {"type": "authorized_user", "client_id": "c.apps.googleusercontent.com", "client_secret": "s3cret-client",
     "refresh_token": "1//refresh-token-value"},  # what `gcloud auth application-default login` writes
    None,  # the file is missing
])
def test_a_key_file_that_cannot_mint_id_tokens_is_a_config_error(tmp_path, monkeypatch, content) -> None:
    from kvx_runtime.auth.gcp import fetch_oauth_id_token

    key_file = tmp_path / "adc.json"
    if content is not None:
        key_file.write_text(json.dumps(content))
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(key_file))
    with pytest.raises(ConfigError) as error:
        fetch_oauth_id_token("kvx-iap-client.apps.googleusercontent.com")
    assert error.value.exit_code == 2
    text = str(error.value) + str(error.value.hint)
    assert str(key_file) in text and "service-account key" in text
    assert "s3cret-client" not in text and "refresh-token-value" not in text
