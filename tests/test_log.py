"""Log output: Cloud Logging JSON in containers, step context on every line."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from typing import Any

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



@pytest.mark.parametrize(("line", "expected"), [
    # <name>key=VALUE, whatever the name and its case
    ("ssh_key=AAAAB3Nza private_key=MIIE", "ssh_key=[redacted] private_key=[redacted]"),
    ("AccountName=acct;AccountKey=c2Vj==;EndpointSuffix=core",
     "AccountName=acct;AccountKey=[redacted];EndpointSuffix=core"),
    ("-H x-api-key=k1 -H X-API-KEY='k2'", "-H x-api-key=[redacted] -H X-API-KEY='k2'"),
    # query parameters and settings whose value is a secret; a value stops at & ; space quotes
    ("?access_token=ya29.a0&alt=json", "?access_token=[redacted]&alt=json"),
    ("token=t1;sig=s1&signature=s2 password=p1 secret=\"s3\"",
     "token=[redacted];sig=[redacted]&signature=[redacted] password=[redacted] secret=\"s3\""),
    ("mytoken=t2 'DB_PASSWORD=p2' uploadid=u1", "mytoken=[redacted] 'DB_PASSWORD=[redacted]' uploadid=[redacted]"),
    ("X-Amz-Credential=AKIA%2F20260101&X-Amz-Security-Token=FwoG&X-Amz-Signature=abc&X-Amz-Date=20260101",
     "X-Amz-Credential=[redacted]&X-Amz-Security-Token=[redacted]&X-Amz-Signature=[redacted]&X-Amz-Date=20260101"),
    ("token=a=b=c&x=1", "token=[redacted]&x=1"),
    # a bare key= only as a query parameter
    ("https://h/v1?key=AIza&alt=json", "https://h/v1?key=[redacted]&alt=json"),
    ("--param key=value and KEY=VALUE; key='x'", "--param key=value and KEY=VALUE; key='x'"),
    ("a monkey=3 keys=4", "a monkey=[redacted] keys=4"),
    # URL credentials; without an "@" nothing is a credential
    ("postgresql://app:pa:ss@db:5432/x and ftp://u:p@h", "postgresql://[redacted]@db:5432/x and ftp://[redacted]@h"),
    ("https://host:8443/path and https://user@host/", "https://host:8443/path and https://user@host/"),
    ("http://a:b/c@d", "http://a:b/c@d"),
    ("tokens, keys and passwords: token= key= password", "tokens, keys and passwords: token= key= password"),
])
def test_redaction_of_each_kind_of_secret(line: str, expected: str) -> None:
    from kvx_runtime.log import redact

    assert redact(line) == expected


# The patterns redact() used before they were made linear: an oracle on short inputs (on long
# ones they are quadratic).
_PREVIOUS_PATTERNS = [
    (r"(?<=://)[^/@\s:]+:[^/@\s]+@", "[redacted]@"),
    (r"(?i)((?:upload_?id|access_token|token|sig|signature|[\w-]+key|password|"
     r"secret|x-amz-(?:security-token|signature|credential))=)[^&;\s'\"]+", r"\1[redacted]"),
    (r"(?i)([?&]key=)[^&;\s'\"]+", r"\1[redacted]"),
]
_PIECES = ["a", "K", "key", "KEY", "Key", "=", "==", "&", "?", ":", "/", "//", "://", "@", "-", "_", " ", "\n",
           "'", '"', ";", "%", "token", "access_", "sig", "signature", "x-amz-", "security-", "credential",
           "password", "secret", "upload", "upload_", "id", "https", "user", "api_", "Account", "é", "\u212a"]


def test_redaction_matches_the_previous_patterns_on_random_short_lines() -> None:
    import random
    import re

    from kvx_runtime.log import _URL_SECRETS

    previous = [(re.compile(pattern), replacement) for pattern, replacement in _PREVIOUS_PATTERNS]
    rng = random.Random(19)
    for _ in range(20_000):
        line = "".join(rng.choice(_PIECES) for _ in range(rng.randint(0, 24)))
        expected = actual = line
        for pattern, replacement in previous:
            expected = pattern.sub(replacement, expected)
        for pattern, replacement in _URL_SECRETS:
            actual = pattern.sub(replacement, actual)
        assert actual == expected, line


def _adversarial_lines() -> dict[str, Any]:
    """Each family of lines that makes a backtracking pattern rescan: size -> a line of about that size."""
    import random

    def mixture(size: int) -> str:  # the same seed at every size: the same kind of text
        rng = random.Random(19)
        return "".join(rng.choice(_PIECES) for _ in range(size // 4))[:size]

    return {
        "a long word": lambda n: "a" * n,
        "a long word ending in key": lambda n: "x" * (n - 3) + "key",
        "a long word ending in key=": lambda n: "x" * (n - 5) + "key=v",
        "key repeated, no =": lambda n: "key" * (n // 3),
        "key repeated, then =": lambda n: "key" * (n // 3) + "=",
        "a long name before key=": lambda n: "a-b_" * (n // 4) + "key=value",
        "a long name before an unfinished key": lambda n: "a-b_" * (n // 4) + "ke",
        "a URL with user: and no @": lambda n: "https://user:" + "p" * n,
        "a URL with colons and no @": lambda n: "https://" + "u:" * (n // 2),
        "many ://": lambda n: "://" * (n // 3),
        "many ://a:b": lambda n: "://a:b" * (n // 6),
        "a run of =": lambda n: "=" * n,
        "a run of &": lambda n: "&" * n,
        "a run of :": lambda n: ":" * n,
        "?key= repeated": lambda n: "?key=" * (n // 5),
        "&key=v repeated": lambda n: "&key=v" * (n // 6),
        "token= repeated": lambda n: "token=" * (n // 6),
        "a mixture": lambda n: "a" * (n // 2) + "key" * (n // 6) + "://u:" * (n // 10),
        "random pieces (seeded)": mixture,
    }


@pytest.mark.parametrize("family", list(_adversarial_lines()))
def test_redaction_of_a_megabyte_line_never_stalls(family: str) -> None:
    """A megabyte of each adversarial family is redacted (linear: milliseconds); a backtracking
    pattern would take hours on it, so the guard's generous limit only ever trips on one.
    How redaction time grows with size is measured by ``make bench`` (``--only logging``),
    never timed here."""
    import threading

    from kvx_runtime.log import redact

    line = _adversarial_lines()[family](1_000_000)
    results: list[str] = []
    worker = threading.Thread(target=lambda: results.append(redact(line)), daemon=True)
    worker.start()
    worker.join(120)
    assert not worker.is_alive(), f"{family}: redacting {len(line)} characters did not finish in 120 s"
    assert len(results) == 1 and isinstance(results[0], str)


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


# A failed command whose process, at its end, hears from a library once more: an atexit callback,
# and a thread-local connection closed when its pool thread ends at the interpreter's exit work
# (what py4j does for each thread that talked to Spark's JVM).
_LATE_LINES_AT_EXIT = """
import atexit
import logging
import threading
from concurrent.futures import ThreadPoolExecutor

from kvx_runtime import lifecycle
from kvx_runtime.errors import NodeError
from kvx_runtime.log import configure_logging, get_logger
from kvx_runtime.process import run_command

lifecycle.install()
configure_logging()


class Connection:
    def __del__(self):
        logging.getLogger("py4j.clientserver").info("Closing down clientserver connection")


local = threading.local()
pool = ThreadPoolExecutor(max_workers=1)
pool.submit(lambda: setattr(local, "connection", Connection())).result()
atexit.register(lambda: logging.getLogger("py4j.java_gateway").warning("Callback Server Shutting Down"))


def fail():
    get_logger("kvx_runtime.step").info("node finished")
    raise NodeError("output 'frame' cannot be pickled to cross to another step")


try:
    run_command("exec-node", fail)
except SystemExit as exc:
    lifecycle.finish(exc.code)
"""


def _run_late_lines(level: str) -> tuple[int, list[dict]]:
    result = subprocess.run([sys.executable, "-c", _LATE_LINES_AT_EXIT], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "KVX_LOG_FORMAT": "json", "KVX_LOG_LEVEL": level})
    assert "Traceback" not in result.stderr, result.stderr
    return result.returncode, [json.loads(line) for line in result.stderr.splitlines() if line.strip()]


def test_lines_logged_after_the_verdict_at_the_process_end_are_kept_at_debug() -> None:
    code, records = _run_late_lines("INFO")
    assert code == 1
    verdict = "exec-node failed: output 'frame' cannot be pickled to cross to another step"
    assert [(r["severity"], r["message"]) for r in records] == [("INFO", "node finished"), ("ERROR", verdict)]
    assert records[-1]["exit_code"] == 1

    code, records = _run_late_lines("DEBUG")  # nothing is lost: the late lines, at DEBUG
    assert code == 1
    messages = [r["message"] for r in records]
    late = records[messages.index(verdict) + 1:]
    assert {(r["message"], r["severity"], r["demoted_from"]) for r in late} == {
        ("Closing down clientserver connection", "DEBUG", "INFO"),
        ("Callback Server Shutting Down", "DEBUG", "WARNING"),
    }
    assert {"severity": "INFO", "message": "node finished"}.items() <= records[messages.index("node finished")].items()


def test_the_next_command_logs_again(json_logs) -> None:
    from kvx_runtime.log import log_verdict

    log_verdict(get_logger("kvx_runtime.cli"), "exec-node failed: boom", exit_code=1)
    logging.getLogger("py4j.clientserver").info("Closing down clientserver connection")
    assert [r["message"] for r in lines(json_logs)] == ["exec-node failed: boom"]
    configure_logging(json_output=True)  # what every command does first
    logging.getLogger("kedro.io.data_catalog").info("Loading data from x")
    assert [(r["severity"], r["message"]) for r in lines(json_logs)] == [("INFO", "Loading data from x")]


def test_logging_imports_no_rich_console_and_leaves_rich_importable() -> None:
    script = (
        "import sys\n"
        "from kvx_runtime.log import configure_logging, get_logger\n"
        "configure_logging(json_output=False)\n"
        "try:\n"
        "    1 / 0\n"
        "except ZeroDivisionError:\n"
        "    get_logger('t').exception('failed')\n"
        "print(sorted(name for name in sys.modules if name.startswith('rich.')))\n"
        "import rich.console\n"
        "print(rich.console.Console.__name__)\n"
    )
    from conftest import fresh_python

    printed, logged = fresh_python(script)
    assert printed == ["[]", "Console"]
    assert "ZeroDivisionError: division by zero" in logged  # the exception, as plain text
