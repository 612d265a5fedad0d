"""Exit codes and the exception hierarchy that maps failures onto them.

Every failure that kvx-runtime reports on purpose is a :class:`KvxError`. Its ``exit_code``
tells the orchestrator what kind of failure it was (see ``ExitCode``) and its message is the
one line printed at exit. Messages must never contain secrets.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """Process exit codes of every kvx-runtime command (the step contract)."""

    SUCCESS = 0
    #: The user's node raised: a bug or bad data in the project, not worth a blind retry.
    NODE_FAILED = 1
    #: Bad usage, configuration or input data: fix the pipeline, do not retry.
    USAGE = 2
    #: Storage, MLflow or auth failed after retries: worth a retry by the orchestrator.
    INFRASTRUCTURE = 3
    #: Interrupted by SIGINT (128 + 2).
    INTERRUPTED = 130
    #: Terminated by SIGTERM (128 + 15), e.g. a preempted Vertex AI machine.
    TERMINATED = 143


class KvxError(Exception):
    """Base of every error kvx-runtime reports with a clear one-line message."""

    exit_code: ExitCode = ExitCode.USAGE

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} ({self.hint})"


class UsageError(KvxError):
    """Wrong command-line usage: unknown node, bad flag value, missing project."""


class ConfigError(KvxError):
    """Invalid configuration: vertexai.yml, Kedro config templates, dynamic config providers."""


class InputDataError(KvxError):
    """An intermediate the step needs is missing, corrupt, truncated or incompatible.

    Retrying the same step cannot help: the producing step or the storage root must be fixed.
    """


class CatalogDataError(InputDataError):
    """A dataset declared in the catalog could not be loaded or saved: a missing file, a
    permission, a malformed file. The project's data or configuration, not the node's code
    (and not transient: those are :class:`InfrastructureError`)."""


class StorageAccessError(ConfigError):
    """The storage root refuses this step, and no retry can change that: the credentials were
    rejected (401/403, a revoked key's ``invalid_grant``, an unreadable credentials file), or the
    root cannot hold files as given (a regular file, a read-only or special file system)."""


class InfrastructureError(KvxError):
    """Storage, MLflow or authentication failed after retries; a retry may succeed."""

    exit_code = ExitCode.INFRASTRUCTURE


class StorageError(InfrastructureError):
    """The storage root could not be read or written after retries."""


class NodeError(KvxError):
    """The user's node raised. The original exception is chained as ``__cause__``."""

    exit_code = ExitCode.NODE_FAILED


class Interrupted(BaseException):
    """SIGINT, SIGTERM or SIGHUP arrived: stop now, clean up, exit 130 (SIGINT) or 143.

    A ``BaseException`` like ``KeyboardInterrupt``, so that a broad ``except Exception`` in
    the user's node cannot swallow the stop request of a preempted machine.
    """

    def __init__(self, signum: int) -> None:
        import signal

        self.signum = signum
        self.signal_name = signal.Signals(signum).name
        super().__init__(f"stopped by {self.signal_name}")
        self.exit_code = (
            ExitCode.INTERRUPTED if signum == signal.SIGINT else ExitCode.TERMINATED
        )
        #: What the stopped command could not finish and left as it was (None: nothing partial).
        self.left_behind: str | None = None


def exception_chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and its causes/contexts, outermost first (cycles cut)."""
    chain: list[BaseException] = []
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        chain.append(current)
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return chain


def find_kvx_error(exc: BaseException) -> KvxError | None:
    """Return the first :class:`KvxError` in ``exc``'s cause/context chain, if any.

    Kedro wraps dataset and hook exceptions; this digs our own error back out so that a
    corrupt blob reports as such (exit 2) and not as a failing node (exit 1).
    """
    return next((item for item in exception_chain(exc) if isinstance(item, KvxError)), None)
