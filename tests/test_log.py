"""Log output: Cloud Logging JSON in containers, step context on every line."""

from __future__ import annotations

import json
import logging

import pytest
import structlog

from kvx_runtime.log import bind_step_context, configure_logging, get_logger


@pytest.fixture
def json_logs(capsys):
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    configure_logging(json_output=True)
    yield capsys
    structlog.contextvars.clear_contextvars()
    structlog.reset_defaults()
    from kvx_runtime.log import _library_defaults

    _library_defaults()
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])


def lines(capsys) -> list[dict]:
    err = capsys.readouterr().err
    return [json.loads(line) for line in err.splitlines() if line.strip()]


def test_our_lines_have_severity_message_and_context(json_logs) -> None:
    bind_step_context(node="train", run_id="r1", job_name="j1")
    get_logger("kvx_runtime.test").warning("blob written", bytes=10)
    (record,) = lines(json_logs)
    assert record["severity"] == "WARNING"
    assert record["message"] == "blob written"
    assert (record["node"], record["run_id"], record["job_name"]) == ("train", "r1", "j1")
    assert record["bytes"] == 10 and "time" in record


def test_kedro_and_user_stdlib_lines_are_json_with_context(json_logs) -> None:
    bind_step_context(node="n", run_id="r", job_name="j")
    logging.getLogger("kedro.io.data_catalog").info(
        "Loading data from %s", "x", extra={"rich_format": ["dark_orange"]}
    )
    (record,) = lines(json_logs)
    assert record["message"] == "Loading data from x"
    assert record["severity"] == "INFO" and record["node"] == "n"
    assert "rich_format" not in record


def test_exceptions_are_rendered_inside_the_json_line(json_logs) -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        get_logger("kvx_runtime.test").error("node raised", exc_info=True)
    (record,) = lines(json_logs)
    assert record["severity"] == "ERROR"
    assert "ValueError: boom" in record["exception"]


def test_python_warnings_become_log_lines(json_logs) -> None:
    import warnings

    # pytest records warnings itself; inside this block Python's normal display path is used.
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        logging.captureWarnings(False)
        logging.captureWarnings(True)
        warnings.warn("something odd", UserWarning, stacklevel=1)
    (record,) = lines(json_logs)
    assert record["severity"] == "WARNING" and "something odd" in record["message"]


def test_kedro_resume_advice_is_dropped(json_logs) -> None:
    logging.getLogger("kedro.runner.sequential_runner").warning(
        "There are 3 nodes that have not run.\nYou can resume ... --from-nodes \"a\""
    )
    logging.getLogger("kedro.runner.sequential_runner").warning("No nodes ran. Repeat the previous command")
    assert lines(json_logs) == []


def test_redaction_of_registered_secrets_url_credentials_and_upload_sessions() -> None:
    from kvx_runtime.log import redact, register_secrets

    register_secrets([{"db": {"password": 's3cr"et-value'}, "short": "ab"}, ["tok-123456"]])
    assert redact('login with s3cr"et-value') == "login with [redacted]"
    assert redact('{"message": "login with s3cr\\"et-value"}') == '{"message": "login with [redacted]"}'
    assert redact("bearer tok-123456 rejected") == "bearer [redacted] rejected"
    assert redact("ab stays: too short to be a secret") == "ab stays: too short to be a secret"
    url = "https://storage.googleapis.com/upload/storage/v1/b/b/o?uploadType=resumable&upload_id=ADPycdt-xyz"
    assert redact(f"404 for {url}") == ("404 for https://storage.googleapis.com/upload/storage/v1/b/b/o?"
                                        "uploadType=resumable&upload_id=[redacted]")
    assert redact("https://user:pa55@mlflow.example.com/api") == "https://[redacted]@mlflow.example.com/api"
    assert redact("GET https://x.googleapis.com/v1/a?alt=json&key=AIzaSy-secret") == \
        "GET https://x.googleapis.com/v1/a?alt=json&key=[redacted]"
    assert redact("api_key=abc123 and AWS_SECRET_ACCESS_KEY=wJalr") == \
        "api_key=[redacted] and AWS_SECRET_ACCESS_KEY=[redacted]"
    assert redact("DefaultEndpointsProtocol=https;AccountKey=c2VjcmV0;x-api-key=k1") == \
        "DefaultEndpointsProtocol=https;AccountKey=[redacted];x-api-key=[redacted]"
    # Advice that merely shows the shape of an argument stays readable.
    assert redact("--param 'x' must look like KEY=VALUE") == "--param 'x' must look like KEY=VALUE"


def test_google_auth_background_access_boundary_lookup_does_not_warn(json_logs, monkeypatch) -> None:
    """google-auth >= 2.62 looks up a service account's Regional Access Boundary in a background
    thread after each token use (2.62 always, 2.63+ when a user opts in with an environment
    variable); where iamcredentials.googleapis.com is unreachable (here: a refused proxy, nothing
    leaves the machine) urllib3 warns about its retries at any moment, even after a command's
    final line. google-auth itself logs that failure at DEBUG."""
    import datetime
    import importlib.util
    import threading

    import google.auth
    import requests
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from google.auth.transport.requests import AuthorizedSession
    from google.oauth2 import service_account

    if importlib.util.find_spec("google.auth._regional_access_boundary_utils") is None:
        pytest.skip(f"google-auth {google.auth.__version__} has no Regional Access Boundary lookup")
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    # 2.63 made the lookup opt-in; users who opt in must still get clean logs.
    monkeypatch.setenv("GOOGLE_SDK_EXPERIMENTAL_PYTHON_REGIONAL_ACCESS_BOUNDARY_LOOKUP_ENABLED", "true")
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    credentials = service_account.Credentials.from_service_account_info({
        "type": "service_account", "client_email": "deployer@kvx-test.iam.gserviceaccount.com",
        "private_key": key, "private_key_id": "k1", "token_uri": "http://127.0.0.1:9/token",
    })
    credentials.token = "a-token"
    credentials.expiry = (datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)
                          + datetime.timedelta(hours=1))

    seen: list[logging.LogRecord] = []
    witness = logging.Handler(level=logging.WARNING)
    witness.emit = seen.append  # type: ignore[method-assign]
    logging.getLogger("urllib3").addHandler(witness)
    try:
        with pytest.raises(requests.ConnectionError):  # nothing listens there: only the lookup matters
            AuthorizedSession(credentials).get("http://127.0.0.1:9/v1/anything", timeout=5)
        for thread in threading.enumerate():
            if type(thread).__name__ == "_RegionalAccessBoundaryRefreshThread":
                thread.join(timeout=30)
    finally:
        logging.getLogger("urllib3").removeHandler(witness)
    assert seen, "google-auth did not look the boundary up: this test no longer checks anything"
    assert "allowedLocations" in seen[0].getMessage()
    assert lines(json_logs) == []
