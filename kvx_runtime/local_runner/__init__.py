"""``run-local``: a compiled pipeline spec executed on this machine (see :mod:`.runner`)."""

from kvx_runtime.local_runner.runner import LocalRunResult, parse_overrides, run_local

__all__ = ["LocalRunResult", "parse_overrides", "run_local"]
