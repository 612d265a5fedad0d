"""kvx-runtime's requests to the pipeline services' APIs (``targets/http.py``): how credential
trouble and answers that are not the API's end, without a network (a session stand-in that
answers as requests does)."""

from __future__ import annotations

from typing import Any

import google.auth.exceptions
import pytest

from kvx_runtime.errors import ExitCode
from kvx_runtime.targets.http import ApiError, request_json


class _Answer:
    def __init__(self, status: int, body: bytes, content_type: str = "application/json") -> None:
        self.status_code = status
        self.content = body
        self.headers = {"Content-Type": content_type}

    def json(self) -> Any:
        import json

        return json.loads(self.content)


class _Session:
    """Raises or answers, one item per request."""

    def __init__(self, *outcomes: Any) -> None:
        self.outcomes = list(outcomes)
        self.requests = 0

    def request(self, *_: Any, **__: Any) -> Any:
        self.requests += 1
        outcome = self.outcomes.pop(0)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome


def _ask(session: _Session) -> Any:
    return request_json(session, "GET", "https://api.example.com/v1/things", service="Vertex AI", what="GET things",
                        attempts=3, wait=0.001)


def test_credentials_refused_for_good_are_exit_2_at_once_saying_so() -> None:
    revoked = google.auth.exceptions.RefreshError("invalid_grant: Token has been expired or revoked.",
                                                  retryable=False)
    session = _Session(revoked, _Answer(200, b"{}"))
    with pytest.raises(ApiError) as raised:
        _ask(session)
    assert raised.value.exit_code == ExitCode.USAGE and session.requests == 1
    assert "credentials were refused" in str(raised.value) and "invalid_grant" in str(raised.value)


def test_a_token_endpoint_briefly_unreachable_is_retried() -> None:
    down = google.auth.exceptions.TransportError("Failed to retrieve http://metadata.google.internal/ token")
    session = _Session(down, _Answer(200, b'{"ok": true}'))
    assert _ask(session) == {"ok": True} and session.requests == 2


def test_credentials_that_cannot_be_had_after_the_tries_are_exit_3() -> None:
    down = google.auth.exceptions.TransportError("metadata server unreachable")
    session = _Session(down, down, down)
    with pytest.raises(ApiError) as raised:
        _ask(session)
    assert raised.value.exit_code == ExitCode.INFRASTRUCTURE and session.requests == 3


def test_an_answer_that_is_not_a_json_object_is_a_one_line_error_naming_the_host() -> None:
    with pytest.raises(ApiError) as raised:
        _ask(_Session(_Answer(200, b'["not", "the", "api"]')))
    assert "answered GET things with a JSON list" in str(raised.value) and "api.example.com" in str(raised.value)
    assert raised.value.exit_code == ExitCode.USAGE


def test_a_kfp_answer_without_the_field_asked_for_is_an_api_error(monkeypatch: pytest.MonkeyPatch) -> None:
    # A host answering 200 with some other JSON object (not KFP's): not a KeyError traceback.
    from kvx_runtime.targets.kubeflow import KubeflowTarget

    target = KubeflowTarget("http://127.0.0.1:9/pipeline", attempts=1)
    monkeypatch.setattr(target, "_find_experiment", lambda: {"name": "Default"})
    with pytest.raises(ApiError, match="has no experiment_id") as raised:
        target.experiment_id()
    assert raised.value.hint and "host" in raised.value.hint

