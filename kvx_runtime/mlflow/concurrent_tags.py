"""Single tag writes that survive steps of one pipeline writing the same new tag at once.

MLflow writes one tag (``MlflowClient.set_tag``, the ``SetTag`` endpoint) as a look-up followed
by an insert, without the retry its batch tag write has. When two parallel steps set the same
tag that does not exist yet (the first parallel steps set the pipeline's ``kedro_command``; we set
``kvx.failed_node``), one insert loses and the database's unique-key violation comes back as a
400 ``BAD_REQUEST`` (or, on an embedded ``sqlite:///`` store, as the same error raised
in-process), failing a step that did nothing wrong. A tag write is idempotent (last writer
wins), so retrying exactly this error is safe.
"""

from __future__ import annotations

import functools
import re
from typing import Any

from kvx_runtime.log import get_logger

__all__ = ["ATTEMPTS", "install_concurrent_tag_retry", "is_unique_key_race"]

log = get_logger(__name__)

#: The unique-key violation as SQLite, PostgreSQL and MySQL word it, through SQLAlchemy.
_UNIQUE_KEY_RACE = re.compile(
    r"UNIQUE constraint failed|duplicate key value violates unique constraint|Duplicate entry|"
    r"UniqueViolation|IntegrityError"
)
ATTEMPTS = 5
_INSTALLED = "_kvx_concurrent_tag_retry"


def is_unique_key_race(exc: BaseException) -> bool:
    """The error a tag insert gets when a concurrent writer inserted the same key first."""
    return bool(_UNIQUE_KEY_RACE.search(str(exc)))


def install_concurrent_tag_retry() -> None:
    """Make ``MlflowClient.set_tag`` (and so ``mlflow.set_tag``) retry a lost insert race.

    Installed once per process; every other error passes through unchanged.
    """
    from mlflow.tracking import MlflowClient

    original = MlflowClient.set_tag
    if getattr(original, _INSTALLED, False):
        return

    from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_random

    @functools.wraps(original)
    def set_tag(self: Any, run_id: str, key: str, value: Any, *args: Any, **kwargs: Any) -> Any:
        def attempt() -> Any:
            return original(self, run_id, key, value, *args, **kwargs)

        # Jittered, so the two writers do not collide again; the second try normally finds the
        # row and updates it.
        retrying = Retrying(stop=stop_after_attempt(ATTEMPTS), wait=wait_random(0.05, 0.5),
                            retry=retry_if_exception(is_unique_key_race), reraise=True,
                            before_sleep=lambda state: log.info(
                                "a concurrent step wrote the same MLflow tag; writing it again",
                                tag=key, attempt=state.attempt_number))
        return retrying(attempt)

    setattr(set_tag, _INSTALLED, True)
    MlflowClient.set_tag = set_tag  # type: ignore[method-assign]
