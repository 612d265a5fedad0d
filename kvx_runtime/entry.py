"""The ``kvx-runtime`` program (console script and ``python -m kvx_runtime``).

Deliberately tiny: the stop-signal handlers are installed (and the collector set for
start-up, :mod:`kvx_runtime.collector`; MLflow's GenAI and gateway packages deferred to their
first use, :mod:`kvx_runtime.lazy_imports`) before the command line, click, logging or any other
kvx-runtime module is imported, and the process ends through
:func:`kvx_runtime.lifecycle.finish`, so that a SIGTERM at any moment ends it with 143.
"""

from __future__ import annotations

import sys
from typing import NoReturn

from kvx_runtime import collector, lazy_imports, lifecycle
from kvx_runtime.errors import Interrupted


def _report(stop: Interrupted) -> None:
    """One line for a stop that came outside a command (during start-up, say)."""
    lifecycle.report_stop(f"kvx-runtime {stop}: nothing was started or left behind", int(stop.exit_code))


def _exit_status(code: object) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)  # what sys.exit("message") would print
    return 1


def main() -> NoReturn:
    """Run the command line and end the process with the contract's exit code."""
    try:
        try:
            lifecycle.install()  # delivers a signal held back by the launcher: inside the try
            collector.start_up()  # before the imports that build most of the heap
            lazy_imports.defer_until_used("mlflow", *lazy_imports.MLFLOW_PACKAGES_RUN_WHEN_USED)
            from kvx_runtime.cli import cli

            cli(prog_name="kvx-runtime")  # standalone mode: ends with SystemExit
            code = 0
        except SystemExit as exc:
            code = _exit_status(exc.code)
    except Interrupted as stop:
        try:
            _report(stop)
        except Interrupted:
            pass
        code = int(stop.exit_code)
    lifecycle.finish(code)
