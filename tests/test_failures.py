"""What a retry can change (kvx_runtime.failures) and gcsfs's request retries under our rule."""

from __future__ import annotations

import asyncio
import threading
import time

import aiohttp
import google.auth.exceptions
import pytest
from aiohttp.http_exceptions import ContentLengthError

from kvx_runtime.failures import http_status, is_refused, is_transient


def _payload_error() -> Exception:
    """What aiohttp raises when the connection ends before the body's Content-Length."""
    cause = ContentLengthError("Not enough data to satisfy content length header.")
    error = aiohttp.ClientPayloadError(f"Response payload is not completed: {cause!r}")
    error.__cause__ = cause
    return error


def _gcsfs_http_error(code: int, message: str = "error") -> Exception:
    from gcsfs.retry import HttpError

    return HttpError({"code": code, "message": message})


def test_a_body_cut_short_is_transient_although_aiohttp_calls_it_400() -> None:
    assert ContentLengthError("short").code == 400  # why this needs a rule at all
    assert http_status(_payload_error()) is None
    assert is_transient(_payload_error())
    assert is_transient(ContentLengthError("short"))
    assert not is_refused(_payload_error())


@pytest.mark.parametrize(("code", "transient", "refused"),
                         [(503, True, False), (429, True, False), (408, True, False), (401, False, True),
                          (403, False, True), (400, False, False), (404, False, False)])
def test_http_answers(code: int, transient: bool, refused: bool) -> None:
    error = _gcsfs_http_error(code)
    assert (is_transient(error), is_refused(error)) == (transient, refused)


def test_a_refused_token_refresh_is_final_and_a_failing_token_endpoint_is_transient() -> None:
    revoked = google.auth.exceptions.RefreshError("invalid_grant: Invalid JWT Signature.", retryable=False)
    down = google.auth.exceptions.RefreshError("Internal Failure", retryable=True)
    assert is_refused(revoked) and not is_transient(revoked)
    assert is_transient(down) and not is_refused(down)


def test_refusals_of_every_storage_library() -> None:
    assert is_refused(OSError("Forbidden: bucket/path\nno storage.objects.create"))  # gcsfs's 403
    assert is_refused(PermissionError("Access Denied"))  # s3fs's 403, local EACCES
    assert is_refused(google.auth.exceptions.DefaultCredentialsError("File x is not a valid json file."))
    assert not is_refused(OSError("disk full"))


def test_connection_trouble_is_transient() -> None:
    assert is_transient(ConnectionResetError("reset"))
    assert is_transient(TimeoutError())
    assert is_transient(aiohttp.ServerDisconnectedError())
    assert not is_transient(FileNotFoundError("x"))


# --- gcsfs's own request retries ---------------------------------------------------------------

def _retried_by_gcsfs(error: Exception) -> bool:
    import gcsfs.retry

    from kvx_runtime.storage.gcs import install_request_retry_policy

    install_request_retry_policy()
    return bool(gcsfs.retry.is_retriable(error))


def test_gcsfs_no_longer_retries_a_refused_refresh_or_a_403() -> None:
    assert not _retried_by_gcsfs(google.auth.exceptions.RefreshError("invalid_grant", retryable=False))
    assert not _retried_by_gcsfs(OSError("Forbidden: b/p"))
    assert _retried_by_gcsfs(_gcsfs_http_error(503))
    # A 401 may be a token that expired in flight: gcsfs's retry with a fresh token stays.
    assert _retried_by_gcsfs(_gcsfs_http_error(401, "Invalid Credentials"))


def test_gcsfs_starts_no_backoff_that_would_end_past_the_operations_deadline() -> None:
    from kvx_runtime.storage.gcs import operation_deadline

    async def failures_retried(count: int) -> list[bool]:
        return [_retried_by_gcsfs(_gcsfs_http_error(503)) for _ in range(count)]

    with operation_deadline(time.monotonic() + 3600):
        assert asyncio.run(failures_retried(5)) == [True] * 5
    # 10 s left: backoffs of 1, 2, 3 and 5 s fit, 9 s does not (failures counted per request task).
    with operation_deadline(time.monotonic() + 10):
        assert asyncio.run(failures_retried(5)) == [True, True, True, True, False]
    with operation_deadline(time.monotonic() - 1):
        assert asyncio.run(failures_retried(1)) == [False]
    assert asyncio.run(failures_retried(1)) == [True]  # no operation under way: gcsfs's own rule


def test_a_blob_operation_in_another_thread_neither_sees_nor_changes_this_ones_deadline() -> None:
    """A step's heartbeat writes from its own thread while the step's blob operations run: each
    request keeps its own operation's deadline, and once both ended none is left behind (an
    expired one left process-wide took gcsfs's retries from every later request)."""
    from kvx_runtime.storage.gcs import operation_deadline

    async def failures_retried(count: int) -> list[bool]:
        return [_retried_by_gcsfs(_gcsfs_http_error(503)) for _ in range(count)]

    beat_entered, main_left, beat_left = threading.Event(), threading.Event(), threading.Event()
    seen: dict[str, list[bool]] = {}

    def heartbeat() -> None:
        with operation_deadline(time.monotonic() + 3600):
            beat_entered.set()
            main_left.wait(10)
            seen["beat"] = asyncio.run(failures_retried(1))
        beat_left.set()

    thread = threading.Thread(target=heartbeat)
    with operation_deadline(time.monotonic() - 1):  # the step's operation: out of time
        thread.start()
        assert beat_entered.wait(10)
        seen["main"] = asyncio.run(failures_retried(1))
    main_left.set()
    assert beat_left.wait(10)
    thread.join(10)

    assert seen == {"main": [False], "beat": [True]}
    assert asyncio.run(failures_retried(1)) == [True]  # no operation under way: gcsfs's own rule


def test_a_malformed_credentials_file_is_named(tmp_path, monkeypatch) -> None:
    from kvx_runtime.errors import ConfigError
    from kvx_runtime.storage.gcs import check_credentials_file

    bad = tmp_path / "key.json"
    bad.write_text('{"type": "service_account", "private_key": "-----BEGIN')
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(bad))
    with pytest.raises(ConfigError, match=f"GOOGLE_APPLICATION_CREDENTIALS \\({bad}\\) is not a usable") as caught:
        check_credentials_file()
    assert "BEGIN" not in str(caught.value)
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "missing.json"))
    with pytest.raises(ConfigError, match="no such file"):
        check_credentials_file()
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS")
    check_credentials_file()
