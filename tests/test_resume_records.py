"""What ``resume`` reads of a run before it starts it again: the job directory's records."""

from __future__ import annotations

import pytest


def test_resume_takes_an_owner_record_it_cannot_read_for_an_error_never_for_no_record(tmp_path) -> None:
    # A damaged or unreachable record said "no step recorded the run id: run-once again", which
    # throws the finished work away; a diagnosis still goes on without it.
    from kvx_runtime.errors import InputDataError
    from kvx_runtime.step.identity import OWNER_RECORD
    from kvx_runtime.step.invocation import ExecNodeInvocation
    from kvx_runtime.storage.store import BlobStore
    from kvx_runtime.submission import recorded_run_id

    invocation = ExecNodeInvocation(nodes=("n",), storage_root=str(tmp_path), job_name="job1")
    assert recorded_run_id(invocation, strict=True) is None  # no record at all
    job = BlobStore(str(tmp_path), "job1")
    (tmp_path / job.job_url.removeprefix(str(tmp_path)).strip("/")).mkdir(parents=True, exist_ok=True)
    (tmp_path / job.job_url.removeprefix(str(tmp_path)).strip("/") / OWNER_RECORD).write_text("{not json")
    with pytest.raises(InputDataError, match="owner record"):
        recorded_run_id(invocation, strict=True)
    assert recorded_run_id(invocation) is None
