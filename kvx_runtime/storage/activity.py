"""A running step's heartbeat in its job directory.

``kvx-runtime gc`` deletes a job's intermediates once nothing in its directory is newer than
the ttl. A step that runs longer than that without writing (a long training node) would let gc
delete what the steps after it still read. While a step runs, a background thread records its
activity (:meth:`~kvx_runtime.storage.store.BlobStore.note_activity`) every
``KVX_HEARTBEAT_INTERVAL`` seconds, the first after the shorter of a minute and the interval:
a step shorter than that writes nothing more. A record that cannot be written is a warning
(once, until one is written again), never the step's failure.
"""

from __future__ import annotations

import threading
from types import TracebackType

from kvx_runtime import settings
from kvx_runtime.log import get_logger

__all__ = ["FIRST_BEAT_AFTER", "Heartbeat", "record_activity"]

log = get_logger(__name__)

#: Seconds before the first record: short steps (most of them) write none.
FIRST_BEAT_AFTER = 60.0
#: Seconds the step's end waits for a record being written (the thread is a daemon: whatever
#: it still does then ends with the process).
_JOIN_TIMEOUT = 2.0


class Heartbeat:
    """``with Heartbeat(root, job_name, who):`` records ``who``'s activity in the job directory
    of ``job_name`` under ``root`` while the block runs."""

    def __init__(self, root: str, job_name: str, who: str, *, interval: float | None = None,
                 first_after: float = FIRST_BEAT_AFTER) -> None:
        self.root = root
        self.job_name = job_name
        self.who = who
        self.interval = settings.HEARTBEAT_INTERVAL.get() if interval is None else interval
        self.first_after = min(first_after, self.interval)
        self.beats = 0  # records written
        self.failures = 0  # records that could not be written
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Heartbeat:
        self._thread = threading.Thread(target=self._run, name="kvx-heartbeat", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=_JOIN_TIMEOUT)

    def _run(self) -> None:
        from kvx_runtime.storage.store import BlobStore, _short

        store: BlobStore | None = None
        failing = False
        wait = self.first_after
        while not self._stop.wait(wait):
            wait = self.interval
            try:
                store = store or BlobStore(self.root, self.job_name)
                store.note_activity(self.who)
            except Exception as exc:  # the step goes on: gc's floor leaves it an hour at least
                self.failures += 1
                if not failing:
                    log.warning("could not record that the step is running in its job directory",
                                job=self.job_name, error=_short(exc),
                                hint="kvx-runtime gc could take the job for finished if this lasts past its ttl")
                failing = True
                continue
            self.beats += 1
            if failing:
                log.info("the step's activity is recorded again", job=self.job_name)
            failing = False


def record_activity(root: str, job_name: str, who: str, *, timeout: float) -> str | None:
    """One activity record of ``who`` (``resume``, before it submits the steps that read the
    job's kept blobs) within ``timeout`` seconds. Returns why it could not be written, None
    when it was: the caller decides whether that stops it."""
    from kvx_runtime.storage.store import BlobStore, _short

    outcome: list[BaseException | None] = []

    def write() -> None:
        try:
            BlobStore(root, job_name).note_activity(who)
            outcome.append(None)
        except BaseException as exc:  # told to the caller, in its thread
            outcome.append(exc)

    thread = threading.Thread(target=write, name="kvx-activity", daemon=True)  # given up on: no wait at exit
    thread.start()
    thread.join(timeout)
    if not outcome:
        return f"no answer within {timeout:g} s"
    error = outcome[0]
    return None if error is None else _short(error)
