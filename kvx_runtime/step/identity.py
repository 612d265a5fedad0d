"""Which run a step belongs to, and the job directory that keeps runs apart.

The run id and job name come from the flags, else from ``KEDRO_CONFIG_RUN_ID`` /
``KEDRO_CONFIG_JOB_NAME``; the job name defaults to the run id and is made unique per run by
the orchestrator (:mod:`kvx_runtime.step.orchestrator`). Both are exported for the config
loader and the user's own code.

Two runs are kept apart only by their job directory's name, so the first step of a run that
touches the directory records who owns it (``owner.json``, a conditional create: concurrent
first steps agree), and every later step checks the record: a directory shared by two runs is
refused naming both (exit 2), never mixed data. The record is also how ``status`` learns the
run id a step really ran with (on Vertex AI the job's uuid, which the API does not return).
"""

from __future__ import annotations

import json
import os
import secrets
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from kvx_runtime.config_loader import env_var_name
from kvx_runtime.errors import ConfigError, InputDataError, UsageError
from kvx_runtime.log import get_logger
from kvx_runtime.step.orchestrator import Orchestrator, current

if TYPE_CHECKING:
    from kvx_runtime.storage.store import BlobStore

__all__ = ["OWNER_RECORD", "JobDirectory", "RunIdentity", "claim_job_directory", "job_directory_name", "read_owner",
           "resolve_identity"]

log = get_logger(__name__)

#: The job directory's record of the run that owns it (not a blob: no ``.bin`` suffix).
OWNER_RECORD = "owner.json"


@dataclass(frozen=True)
class RunIdentity:
    run_id: str
    #: The job directory's name (and the MLflow run's): unique per run.
    job_name: str

    def export(self) -> None:
        """``KEDRO_CONFIG_RUN_ID`` / ``_JOB_NAME``: what ``${run_id}`` and the user's code read."""
        os.environ[env_var_name("run_id")] = self.run_id
        os.environ[env_var_name("job_name")] = self.job_name


def local_run_id() -> str:
    return time.strftime("local-%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(3)


def resolve_identity(run_id: str | None, job_name: str | None, *,
                     missing: Literal["invent", "refuse"] = "refuse",
                     orchestrator: Orchestrator | None = None) -> RunIdentity:
    """The step's run identity, flags first, then the environment. Without a run id a step
    started by hand (``missing="invent"``) belongs to the run its job name names, else to a new
    local one; the MLflow steps refuse."""
    run_id = run_id or os.environ.get(env_var_name("run_id"))
    job_name = job_name or os.environ.get(env_var_name("job_name"))
    if not run_id:
        if missing == "refuse":
            raise UsageError("no run id", hint="pass --run-id (and --job-name) or set KEDRO_CONFIG_RUN_ID")
        # Steps started by hand with one --job-name are one run: the job names it.
        run_id = job_name or local_run_id()
    job_name = job_name or run_id
    return RunIdentity(run_id, (orchestrator or current()).job_directory_name(job_name, run_id))


def job_directory_name(run_id: str | None, job_name: str | None) -> str | None:
    """The job directory's name where the run id may be unknown (``mlflow-end``, which can
    find the MLflow run by its id instead): the job name as given then, None without one."""
    run_id = run_id or os.environ.get(env_var_name("run_id"))
    if run_id:
        return resolve_identity(run_id, job_name).job_name
    return job_name or os.environ.get(env_var_name("job_name")) or None


def claim_job_directory(store: BlobStore, identity: RunIdentity) -> None:
    """Record this run as the job directory's owner, or check that it is (see the module)."""
    ours = json.dumps({"format": 1, "run_id": identity.run_id, "job_name": identity.job_name},
                      sort_keys=True).encode()
    owner = _owner(store.first_record(OWNER_RECORD, ours), store)
    if owner != identity.run_id:
        raise UsageError(
            f"the job directory {store.job_url} belongs to run {owner}, not to this run ({identity.run_id}): "
            "two runs share one job directory, and would read each other's intermediates",
            hint="give each run its own job name (--job-name), or pass the owner's --run-id to continue that run",
        )


class JobDirectory:
    """The run's directory under the storage root, opened (and its owner checked) on first use:
    a step that exchanges no intermediates never touches storage."""

    def __init__(self, root: str | None, identity: RunIdentity) -> None:
        self.root = root
        self.identity = identity
        self._store: BlobStore | None = None

    def store(self, purpose: str) -> BlobStore:
        """The run's :class:`~kvx_runtime.storage.store.BlobStore`; ``purpose`` says why a
        step without a storage root needs one."""
        if not self.root:
            raise ConfigError(f"{purpose} but no storage root is set",
                              hint="pass --storage-root or set run_config.root in vertexai.yml")
        if self._store is None:
            from kvx_runtime.storage.store import BlobStore

            store = BlobStore(self.root, self.identity.job_name)
            claim_job_directory(store, self.identity)
            self._store = store
        return self._store


def read_owner(store: BlobStore) -> str | None:
    """The run id the job directory's steps ran with, None if no step recorded it."""
    raw = store.read_record(OWNER_RECORD)
    return None if raw is None else _owner(raw, store)


def _owner(raw: bytes, store: BlobStore) -> str:
    try:
        return str(json.loads(raw)["run_id"])
    except (ValueError, KeyError, TypeError):
        raise InputDataError(f"the owner record {store.job_url}/{OWNER_RECORD} is unreadable",
                             hint="it names the run the job directory belongs to: delete the job directory "
                             "if no run needs it") from None
