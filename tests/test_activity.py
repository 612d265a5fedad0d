"""A running step's heartbeat in its job directory (kvx_runtime.storage.activity): records
while the step runs, none for a short step, a warning (never a failure) when storage refuses,
and a bad interval refused in one line."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from kvx_runtime.errors import ConfigError
from kvx_runtime.storage.activity import Heartbeat, record_activity
from kvx_runtime.storage.store import ACTIVITY_DIR, BlobStore


def activity(root: Path, job: str) -> Path:
    return Path(BlobStore(str(root), job).job_url) / ACTIVITY_DIR


def wait_for(condition, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return False


def test_a_running_step_records_its_activity_again_and_again_then_stops(tmp_path: Path) -> None:
    with Heartbeat(str(tmp_path), "job", "train_model_node", interval=0.1) as beat:
        assert wait_for(lambda: beat.beats >= 1)
        record = activity(tmp_path, "job") / "train_model_node.json"
        first = json.loads(record.read_text())
        assert first["who"] == "train_model_node"
        assert wait_for(lambda: beat.beats >= 3)
        assert json.loads(record.read_text())["at"] > first["at"]
    assert beat._thread is not None and not beat._thread.is_alive()
    beats = beat.beats
    time.sleep(0.3)
    assert beat.beats == beats  # stopped with the step


def test_a_short_step_writes_no_record(tmp_path: Path) -> None:
    with Heartbeat(str(tmp_path), "job", "quick", interval=600) as beat:
        time.sleep(0.05)
    assert beat.beats == 0 and beat.first_after == 60
    assert not activity(tmp_path, "job").exists()


def test_a_record_that_cannot_be_written_is_one_warning_not_a_failure(tmp_path: Path, caplog) -> None:
    blocked = tmp_path / "root"
    blocked.write_text("a file where the storage root's directory would be")
    with Heartbeat(str(blocked), "job", "step", interval=0.05) as beat:
        assert wait_for(lambda: beat.failures >= 3)
    assert beat.beats == 0
    assert caplog.text.count("could not record that the step is running in its job directory") == 1


@pytest.mark.parametrize("interval", ["3601", "0.5"])  # over gc's floor; faster than GCS takes writes to one object
def test_a_bad_interval_is_refused_in_one_line(interval: str, monkeypatch) -> None:
    monkeypatch.setenv("KVX_HEARTBEAT_INTERVAL", interval)
    with pytest.raises(ConfigError, match="KVX_HEARTBEAT_INTERVAL"):
        Heartbeat("/tmp/x", "job", "step")


def test_one_record_is_written_or_says_why(tmp_path: Path) -> None:
    assert record_activity(str(tmp_path), "job", "resume", timeout=10) is None
    assert json.loads((activity(tmp_path, "job") / "resume.json").read_text())["who"] == "resume"
    blocked = tmp_path / "file"
    blocked.write_text("")
    why = record_activity(str(blocked), "job", "resume", timeout=10)
    assert why is not None and f"storage root {blocked} cannot hold intermediates: Not a directory" in why
