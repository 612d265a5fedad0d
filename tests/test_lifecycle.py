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


_SWALLOWED_IN_A_FINALIZER = """
import signal
from kvx_runtime import lifecycle
from kvx_runtime.errors import Interrupted

lifecycle.install()


class Finalized:
    def __del__(self):
        signal.raise_signal(signal.SIGTERM)
        for _ in range(1000):  # the handler runs here, inside __del__, where Python swallows it
            pass


try:
    Finalized()
    for _ in range(10 ** 6):
        pass
    print("not stopped")
except Interrupted as exc:
    print(exc)
lifecycle.finish(0)
"""


def test_a_stop_raised_inside_a_finalizer_still_stops_the_command() -> None:
    result = subprocess.run([sys.executable, "-c", _SWALLOWED_IN_A_FINALIZER], capture_output=True, text=True,
                            timeout=60)
    assert result.stdout.strip() == "stopped by SIGTERM", result.stdout + result.stderr
    assert result.returncode == 143
    assert "Exception ignored" not in result.stderr and "Traceback" not in result.stderr, result.stderr


_STOPPED_WHILE_ENDING = """
import atexit, logging, signal, sys
from kvx_runtime import lifecycle
from kvx_runtime.log import configure_logging, get_logger

lifecycle.install()
configure_logging()
get_logger("kvx_runtime.step.executor").info("step finished")
atexit.register(logging.shutdown)  # logging's own end comes before the signal
atexit.register(signal.raise_signal, signal.SIGTERM)  # the exit work runs callbacks last-in first
lifecycle.finish(int(sys.argv[1]))
"""


@pytest.mark.parametrize(("code", "outcome"), [(0, "had succeeded"), (3, "had ended with exit 3")])
def test_a_stop_signal_after_the_outcome_is_known_ends_with_143_and_says_so(code: int, outcome: str) -> None:
    """A step's outputs were complete when SIGTERM came (the machine is going away as the step
    ends): the exit code reports the signal, and the last line says what the command had come to
    rather than leaving "step finished" as the last word of a process that exits 143."""
    result = subprocess.run([sys.executable, "-c", _STOPPED_WHILE_ENDING, str(code)], capture_output=True, text=True,
                            timeout=60, env={"PATH": "/usr/bin:/bin", "KVX_LOG_FORMAT": "json"})
    assert result.returncode == 143, result.stderr
    lines = result.stderr.strip().splitlines()
    assert json.loads(lines[0])["message"] == "step finished"
    last = json.loads(lines[-1])
    assert last["severity"] == "ERROR" and last["exit_code"] == 143
    assert last["message"] == f"kvx-runtime stopped by SIGTERM as it was ending: the command {outcome}"
