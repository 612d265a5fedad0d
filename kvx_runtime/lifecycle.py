"""The life of a kvx-runtime process: stop signals honoured from its first instruction to its
last, and an end that always reports the exit code of the contract.

SIGTERM (a preempted machine, a cancelled run) and SIGINT end every command with 143 and 130
(:class:`~kvx_runtime.errors.ExitCode`), whenever they arrive:

- **start-up and imports**: the handlers are installed by :func:`install` before anything but
  this module and :mod:`kvx_runtime.errors` is imported. The interpreter's own start-up comes
  before any Python code; a launcher closes that window by starting us with the stop signals
  blocked (:func:`held_across_exec`, as ``run-local`` does): they are then delivered the moment
  the handlers are in place;
- **the work**: a signal raises :class:`~kvx_runtime.errors.Interrupted` (a BaseException that a
  node's ``except Exception`` cannot swallow); the command stops, cleans up, leaves nothing
  partial behind and exits 130/143;
- **the end**: once the command's outcome is known, :func:`finish` runs the interpreter's exit
  work (thread shutdown, atexit callbacks such as MLflow's and logging's) with a signal only
  recorded, then ends the process itself, with 128 + the signal if one came (its last line then
  says so, and what the command had come to). Python's own
  finalization would reset the handlers to the default action part-way (the process then dies
  "by signal 15") or drop a signal raised inside an atexit callback (exit 0).

A second stop signal ends the process at once, with the code of the first. A stop raised
where Python swallows exceptions (an object's ``__del__``, a weakref callback: "Exception
ignored in ...") is raised again at the next instruction, so it still stops the command.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, NoReturn

from kvx_runtime.errors import Interrupted

__all__ = ["STOP_SIGNALS", "finish", "held_across_exec", "install", "on_abrupt_exit", "report_stop", "settle",
           "stop_code", "stopping"]

#: SIGHUP (the terminal of an interactive command closed) stops a command as SIGTERM does.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

_received: int | None = None
_abrupt_exit_work: list[Callable[[], None]] = []
_finishing = False
_received_while_finishing = False


def stop_code(signum: int) -> int:
    """The exit code of a command stopped by ``signum``: 130 for SIGINT, 143 for SIGTERM (as
    shells and Kubernetes report them) and SIGHUP."""
    return int(Interrupted(signum).exit_code)


def stopping() -> bool:
    """Whether a stop signal came: the process is on its way out (an orchestrator's grace
    period is short: work that may wait on the network is better left undone)."""
    return _received is not None


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError, AttributeError):
            pass


def report_stop(message: str, exit_code: int) -> None:
    """The verdict line of a stop that no command reported. The stop may have cut an import
    short and left a library half-imported, or come after logging shut down: then the line is
    written without the logging machinery."""
    try:
        from kvx_runtime.log import configure_logging, get_logger, log_verdict

        configure_logging()
        log_verdict(get_logger("kvx_runtime.cli"), message, exit_code=exit_code)
    except Exception:
        import json

        sys.stderr.write(json.dumps({"severity": "ERROR", "message": message, "logger": "kvx_runtime.cli",
                                     "exit_code": exit_code}) + "\n")


def _on_stop_signal(signum: int, _frame: Any) -> None:
    global _received, _received_while_finishing
    if _received is not None:  # the second one: now
        for work in list(_abrupt_exit_work):
            try:
                work()
            except BaseException:  # the end must come
                pass
        _flush()
        os._exit(stop_code(_received))
    _received = signum
    if not _finishing:
        raise Interrupted(signum)
    # Finishing: the outcome is known; the exit code and the last line will say a signal came.
    _received_while_finishing = True


@contextmanager
def on_abrupt_exit(work: Callable[[], None]) -> Iterator[None]:
    """While the block runs, a second stop signal (which ends the process at once) first runs
    ``work``: what must not outlive the process (run-local's steps), ended without waiting."""
    _abrupt_exit_work.append(work)
    try:
        yield
    finally:
        _abrupt_exit_work.remove(work)


def _on_unraisable(unraisable: Any) -> None:
    """An :class:`Interrupted` raised inside a finalizer is swallowed by Python: raise it again
    a moment later, once the finalizer has returned (a one-shot timer; should that land in a
    finalizer too, this runs again). Anything else goes to Python's own hook."""
    stop = unraisable.exc_value
    if not isinstance(stop, Interrupted) or _finishing:
        sys.__unraisablehook__(unraisable)
        return
    previous = signal.getsignal(signal.SIGALRM)

    def raise_again(_signum: int, _frame: Any) -> None:
        signal.signal(signal.SIGALRM, previous if previous is not None else signal.SIG_DFL)
        raise Interrupted(stop.signum)

    try:  # handlers run in the main thread, so the stop was raised (and swallowed) there
        signal.signal(signal.SIGALRM, raise_again)
    except ValueError:
        sys.__unraisablehook__(unraisable)
        return
    signal.setitimer(signal.ITIMER_REAL, 0.01)


def install(*, own_process: bool = True) -> None:
    """Turn SIGTERM/SIGINT into :class:`Interrupted`; deliver any a launcher held back. Only the
    program itself (``own_process``) also takes over ``sys.unraisablehook``: a host process
    running a command in-process (a test runner) keeps its own."""
    global _finishing, _received_while_finishing
    _finishing = _received_while_finishing = False  # a command starts: its outcome is not known
    if own_process:
        sys.unraisablehook = _on_unraisable
    for signum in STOP_SIGNALS:
        signal.signal(signum, _on_stop_signal)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


@contextmanager
def held_across_exec() -> Iterator[None]:
    """Processes started inside this block begin with the stop signals blocked (the mask is
    inherited across fork and exec): a signal sent to one before its handlers exist waits for
    them instead of killing it. Only kvx-runtime commands unblock them, so start nothing else
    here."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _interpreter_exit_work() -> None:
    """What Python's finalization would do that matters: wait for non-daemon threads (and stop
    idle thread pools), then run the atexit callbacks (MLflow's, logging's flush...)."""
    import atexit
    import threading

    shutdown = getattr(threading, "_shutdown", None)
    if shutdown is not None and threading.current_thread() is threading.main_thread():
        shutdown()
    atexit._run_exitfuncs()


def settle() -> None:
    """The command's outcome is known (its verdict logged): a stop signal from now on is only
    recorded, so that it cannot turn a finished command into "nothing was started", and
    :func:`finish` reports it."""
    global _finishing
    _finishing = True


def finish(code: int) -> NoReturn:
    """End the process with ``code``, or with 128 + the stop signal that came before the end."""
    settle()
    try:
        _interpreter_exit_work()
    except BaseException:  # the end must come, whatever the exit work raises
        pass
    finally:
        # The end is decided here: a signal arriving after this check (during the flush) would
        # change the exit code without the line saying why, so the stop signals are held from now.
        if hasattr(signal, "pthread_sigmask"):
            signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        if _received_while_finishing and _received is not None:
            _report_late_stop(_received, code)
        _flush()
        os._exit(stop_code(_received) if _received is not None else code)


def _report_late_stop(signum: int, code: int) -> None:
    """A signal that came once the command had ended: its outcome stands (a finished step's
    outputs are complete), but the process ends with 128 + the signal, and says why."""
    stop = Interrupted(signum)
    outcome = "had succeeded" if code == 0 else f"had ended with exit {code}"
    try:
        report_stop(f"kvx-runtime {stop} as it was ending: the command {outcome}", int(stop.exit_code))
    except BaseException:  # the end must come
        pass
