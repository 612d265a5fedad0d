"""Auth building blocks: token caching by expiry, provider selection, env credentials,
final-status parsing, and redaction of credentials in messages."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys

import pytest

from kvx_runtime.auth import build_request_header_provider
from kvx_runtime.auth.env import EnvCredentialsRequestHeaderProvider
from kvx_runtime.auth.gcp import (
    HandedGoogleIdTokenProvider,
    MLFlowGoogleIAMRequestHeaderProvider,
    MLFlowGoogleOAuthRequestHeaderProvider,
)
from kvx_runtime.auth.tokens import REFRESH_MARGIN, TokenCache, jwt_expiry
from kvx_runtime.errors import ConfigError, UsageError
from kvx_runtime.mlflow.pipeline_run import (
    FINAL_STATES,
    infrastructure_error,
    parse_final_status,
    without_url_credentials,
)


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
    assert without_url_credentials("https://user:s3cret@mlflow.example.com/api") == "https://mlflow.example.com/api"
    error = infrastructure_error("connect", "https://u:pw@host", ConnectionError("Max retries exceeded with url https://u:pw@host/x"))
    assert "pw" not in str(error) and "unreachable" in str(error)
    assert "unauthenticated (401)" in str(infrastructure_error("connect", None, Exception("HTTP 401 Unauthorized")))


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


def google_jwt(issued: float, lifetime: float = 3600.0) -> str:
    body = base64.urlsafe_b64encode(json.dumps({"iat": issued, "exp": issued + lifetime}).encode())
    return f"e30.{body.rstrip(b'=').decode()}.sig"


class HandedProvider(HandedGoogleIdTokenProvider):
    """The provider with the test's clock; ``minted`` stands for the step's own credentials."""

    def __init__(self, clock: Clock, minted: list[str] | None = None) -> None:
        super().__init__({"audience": AUDIENCE}, clock=clock)
        self.tokens = TokenCache(clock=clock)
        self.minted = minted

    def _mint(self) -> str:
        if self.minted is None:
            return super()._mint()  # the real thing: here, a key file that is missing
        self.minted.append(google_jwt(self._clock()))
        return self.minted[-1]


AUDIENCE = "kvx-iap-client.apps.googleusercontent.com"


def test_a_handed_id_token_is_used_then_renewed_from_the_steps_own_credentials(monkeypatch) -> None:
    clock = Clock()
    handed = google_jwt(clock.now - 600)  # the worker minted it 10 minutes ago
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", handed)
    minted: list[str] = []
    provider = HandedProvider(clock, minted)
    assert provider.request_headers() == {"Authorization": f"Bearer {handed}"} and minted == []
    clock.now += 3000 - REFRESH_MARGIN + 1  # inside the margin before the handed token's exp
    assert provider.request_headers() == {"Authorization": f"Bearer {minted[0]}"}
    clock.now += 3600  # the renewed token is renewed in turn
    assert provider.request_headers() == {"Authorization": f"Bearer {minted[1]}"}


def test_a_refused_handed_token_is_replaced_at_once_and_never_sent_again(monkeypatch, tmp_path) -> None:
    clock = Clock()
    handed = google_jwt(clock.now)
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", handed)
    minted: list[str] = []
    provider = HandedProvider(clock, minted)
    assert provider.request_headers() == {"Authorization": f"Bearer {handed}"}
    provider.invalidate()  # MLflow answered 401 to it (revoked, or the clocks disagree)
    assert provider.request_headers() == {"Authorization": f"Bearer {minted[0]}"}
    provider.invalidate()  # the minted one refused: a new one, the handed one still not
    assert provider.request_headers() == {"Authorization": f"Bearer {minted[1]}"}

    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "missing.json"))
    cannot_mint = HandedProvider(clock)
    cannot_mint.request_headers()
    cannot_mint.invalidate()
    with pytest.raises(ConfigError, match="was refused by the tracking server"):
        cannot_mint.request_headers()  # not the refused token again, an hour before its end


class FailingMint(HandedProvider):
    """The step's own credentials cannot mint (no metadata server, no key): counted."""

    attempts = 0

    def _mint(self) -> str:
        from kvx_runtime.auth.gcp import GoogleAuthError

        self.attempts += 1
        raise GoogleAuthError("no Google credentials for an ID token")


def test_a_step_without_google_credentials_uses_the_handed_token_to_its_end_then_says_why(
        monkeypatch, caplog) -> None:
    from kvx_runtime.auth.gcp import GoogleAuthError
    from kvx_runtime.errors import ExitCode

    clock = Clock()
    handed = google_jwt(clock.now)
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", handed)
    provider = FailingMint(clock)
    clock.now += 3600 - 60  # past the margin: a new token is wanted, none can be minted
    for _ in range(20):
        assert provider.request_headers() == {"Authorization": f"Bearer {handed}"}
    assert provider.attempts == 1  # tried again only every 30 s, not at each request
    assert caplog.text.count("expires soon") == 1
    clock.now += 31
    provider.request_headers()
    assert provider.attempts == 2
    clock.now += 25  # 4 s before exp: too late to send it
    with pytest.raises(GoogleAuthError) as error:
        provider.request_headers()
    provider.invalidate()  # the request went without credentials (MLflow's client goes on): 401
    with pytest.raises(GoogleAuthError, match="has expired"):  # not "refused": it was not sent
        provider.request_headers()
    assert error.value.exit_code == ExitCode.INFRASTRUCTURE
    text = str(error.value) + str(error.value.hint)
    assert "has expired" in text and AUDIENCE in text and "Workload Identity" in text
    assert handed not in text


def test_a_credentials_file_that_cannot_mint_is_the_users_to_fix_exit_2(monkeypatch, tmp_path) -> None:
    clock = Clock()
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", google_jwt(clock.now - 3600, lifetime=3601))
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "missing.json"))
    with pytest.raises(ConfigError) as error:
        HandedProvider(clock).request_headers()
    assert error.value.exit_code == 2 and "has expired" in str(error.value)
    assert "service-account key" in str(error.value.hint)  # the key file's own fix


def test_installing_the_handed_token_provider_takes_the_token_out_of_the_environment(monkeypatch) -> None:
    from kvx_runtime.auth import active_provider, install_request_header_provider, uninstall_request_header_provider
    from kvx_runtime.config import MLflowConfig

    handed = google_jwt(1_000_000.0)
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", handed)
    assert build_request_header_provider(None, {}) is None  # no audience: the token is MLflow's as given
    monkeypatch.setenv("KVX_MLFLOW_TOKEN_AUDIENCE", AUDIENCE)
    assert install_request_header_provider(MLflowConfig())
    try:
        provider = active_provider()
        assert isinstance(provider, HandedGoogleIdTokenProvider) and provider.audience == AUDIENCE
        # MLflow would send the environment's token instead of the provider's headers.
        assert "MLFLOW_TRACKING_TOKEN" not in os.environ
        assert install_request_header_provider(MLflowConfig())  # again (a step's fallback path)
        assert active_provider() is not provider and active_provider()._handed == handed
    finally:
        uninstall_request_header_provider()
    assert os.environ["MLFLOW_TRACKING_TOKEN"] == handed


def test_installing_a_provider_does_not_import_mlflow() -> None:
    code = ("import sys\n"
            "from kvx_runtime.auth import install_request_header_provider\n"
            "from kvx_runtime.config import MLflowConfig\n"
            "install_request_header_provider(MLflowConfig(request_header_provider_params={'client_id': 'x'}))\n"
            "assert 'mlflow' not in sys.modules\n"
            "from mlflow.utils import rest_utils\n"
            "assert hasattr(rest_utils.http_request, '__wrapped__'), 'the 401 retry is installed on import'\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
