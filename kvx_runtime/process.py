"""The process-level contract of every kvx-runtime command.

Logging set up first, SIGTERM/SIGINT turned into a clean stop, and every failure ending in one
clear log line, its verdict (:func:`~kvx_runtime.log.log_verdict`: lines logged after it are kept
at DEBUG), and the documented exit code (see :class:`~kvx_runtime.errors.ExitCode`).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, NoReturn

from kvx_runtime.errors import ExitCode, Interrupted, KvxError
from kvx_runtime.log import get_logger, log_verdict

__all__ = ["install_signal_handlers", "run_command", "run_unless_ok"]

log = get_logger("kvx_runtime.cli")


def install_signal_handlers() -> None:
    """SIGTERM/SIGINT raise :class:`Interrupted` (see :mod:`kvx_runtime.lifecycle`)."""
    from kvx_runtime.lifecycle import install

    install(own_process=False)  # the program (kvx_runtime.entry) installed the rest


def run_unless_ok(what: str, action: Callable[[], Any]) -> None:
    """Run a start-up action; a failure ends the process like a command failure."""
    try:
        action()
    except KvxError as exc:
        log_verdict(log, f"{what}: {exc}", exit_code=int(exc.exit_code))
        _exit(int(exc.exit_code))


def _exit(code: int) -> NoReturn:
    from kvx_runtime.lifecycle import settle

    settle()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    sys.exit(code)


def run_command(command: str, action: Callable[[], Any]) -> NoReturn:
    """Run ``action`` under the exit-code contract and exit the process."""
    try:
        action()
    except KvxError as exc:
        log_verdict(log, f"{command} failed: {exc}", exit_code=int(exc.exit_code), error_type=type(exc).__name__,
                    error=exc.message)
        _exit(int(exc.exit_code))
    except Interrupted as exc:
        log_verdict(log, f"{command} {exc}: {exc.left_behind or 'nothing partial was left behind'}",
                    exit_code=int(exc.exit_code))
        _exit(int(exc.exit_code))
    except Exception as exc:  # a bug in kvx-runtime itself: show everything
        log_verdict(
            log,
            f"{command} failed with an internal error: {type(exc).__name__}: {exc}",
            exit_code=int(ExitCode.NODE_FAILED),
            exc_info=True,
        )
        _exit(int(ExitCode.NODE_FAILED))
    _exit(int(ExitCode.SUCCESS))
