"""The process's life: a stop signal at the very start still ends the program with 130/143."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest

from kvx_runtime.lifecycle import held_across_exec


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_stop_signal_sent_before_the_handlers_exist_waits_for_them(signum: int, code: int) -> None:
    """Sent the instant the process exists: held across exec, delivered when the handlers are in
    place (before click, logging or the command are imported), reported in one line."""
    with held_across_exec():
        process = subprocess.Popen([sys.executable, "-m", "kvx_runtime", "doctor", "--help"],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   env={"PATH": "/usr/bin:/bin", "KVX_LOG_FORMAT": "json"})
    process.send_signal(signum)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == code, stderr
    assert stdout == ""  # the command never ran
    last = json.loads(stderr.strip().splitlines()[-1])
    assert last["severity"] == "ERROR"
    name = signal.Signals(signum).name
    assert last["message"] == f"kvx-runtime stopped by {name}: nothing was started or left behind"
    assert "Traceback" not in stderr


def test_held_across_exec_restores_the_mask() -> None:
    before = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    with held_across_exec():
        assert signal.SIGTERM in signal.pthread_sigmask(signal.SIG_BLOCK, [])
    assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == before
