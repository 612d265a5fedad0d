"""`kvx-runtime gc` never deletes what a run still needs: a job written to during the gc, a
file written after the job's last listing, the blob of an entry its listing missed, or
anything when a listing fails; and never deletes young jobs (a running pipeline's).

Real local storage roots; a listing's timing is forced by wrapping the file system's own calls.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import fsspec
import pytest
from click.testing import CliRunner

from kvx_runtime.cli import cli
from kvx_runtime.errors import ExitCode, StorageError, UsageError
from kvx_runtime.storage import gc
from kvx_runtime.storage.gc import MIN_DELETE_AGE, collect_garbage, describe
from kvx_runtime.storage.store import BlobStore, RetryPolicy

WEEK = 7 * 86400
FAST_RETRY = RetryPolicy(attempts=1, initial_wait=0.0, budget=1.0)


def old_job(root: Path, name: str, *datasets: str) -> BlobStore:
    """A job whose blobs were written a month ago."""
    store = BlobStore(str(root), name, retry=FAST_RETRY)
    month_ago = time.time() - 30 * 86400
    for dataset in datasets or ("a",):
        store.save(dataset, list(range(100)))
        os.utime(store.path(dataset), (month_ago, month_ago))
    return store


def test_a_job_written_to_during_gc_is_kept_whole(tmp_path: Path, monkeypatch) -> None:
    """`resume` of an old job records its activity between gc's first listing and its delete:
    the job stays, with the blobs its resumed steps read."""
    store = old_job(tmp_path, "resumed-job")
    real_jobs = gc._jobs

    def jobs_then_resume(*args, **kwargs):
        found = real_jobs(*args, **kwargs)
        store.note_activity("resume")  # after gc listed the job as a month old
        return found

    monkeypatch.setattr(gc, "_jobs", jobs_then_resume)
    report = collect_garbage(str(tmp_path), WEEK, delete=True)

    assert not report.expired_jobs and [name for name, _ in report.revived_jobs] == ["resumed-job"]
    assert store.load("a") == list(range(100))
    assert "kept job resumed-job: written to during this gc (0 minutes ago)" in describe(report)


def test_only_the_files_of_the_last_listing_are_deleted(tmp_path: Path, monkeypatch) -> None:
    """A blob written after gc listed the job for the last time (a step of a run reusing the
    name) is not deleted with the expired ones, nor is its directory."""
    store = old_job(tmp_path, "job", "a", "b")
    fs = fsspec.filesystem("file")
    real_rm = fs.rm

    def write_then_rm(paths, *args, **kwargs):
        store.save("late", "new")  # lands between the last listing and the delete
        return real_rm(paths, *args, **kwargs)

    monkeypatch.setattr(fs, "rm", write_then_rm)
    report = collect_garbage(str(tmp_path), WEEK, delete=True)

    assert [name for name, _, _ in report.expired_jobs] == ["job"]
    assert not Path(store.path("a")).exists() and not Path(store.path("b")).exists()
    assert store.load("late") == "new"


def test_expired_job_directories_go_whole_on_a_local_disk(tmp_path: Path) -> None:
    store = old_job(tmp_path, "job", "a")
    month_ago = time.time() - 30 * 86400
    store.note_activity("a step")
    activity = Path(store.path("a")).parent / "activity"
    for path in activity.iterdir():
        os.utime(path, (month_ago, month_ago))
    collect_garbage(str(tmp_path), WEEK, delete=True)
    assert not Path(store.path("a")).parent.exists()


def test_a_recent_activity_record_keeps_an_old_job(tmp_path: Path) -> None:
    """A step running for longer than the ttl without writing a blob (its heartbeat writes)."""
    store = old_job(tmp_path, "long-step")
    store.note_activity("train_model_node")
    report = collect_garbage(str(tmp_path), WEEK, delete=True)
    assert not report.expired_jobs and store.load("a") == list(range(100))


def test_deleting_young_jobs_is_refused_a_dry_run_lists_them(tmp_path: Path) -> None:
    store = BlobStore(str(tmp_path), "running", retry=FAST_RETRY)
    store.save("a", 1)
    with pytest.raises(UsageError, match=r"^gc deletes only what is at least 1 hours old, not 0 seconds") as refused:
        collect_garbage(str(tmp_path), 0, delete=True)
    assert refused.value.exit_code == ExitCode.USAGE
    assert [name for name, _, _ in collect_garbage(str(tmp_path), 0).expired_jobs] == ["running"]
    assert store.load("a") == 1

    result = CliRunner().invoke(cli, ["gc", "--storage-root", str(tmp_path), "--older-than", "600", "--yes"])
    assert result.exit_code == ExitCode.USAGE, result.output
    assert "gc deletes only what is at least 1 hours old, not 600 seconds" in result.output
    assert "Traceback" not in result.output and store.load("a") == 1
    assert MIN_DELETE_AGE == 3600


def test_a_failed_listing_deletes_no_cache_entry(tmp_path: Path, monkeypatch) -> None:
    """A listing of the job directories that fails (a permission, an I/O error) is no listing:
    gc stops (exit 3) instead of taking every entry's blob for gone."""
    from kvx_runtime.cache.key import StepKey
    from kvx_runtime.cache.store import StepCache

    store = BlobStore(str(tmp_path), "job", retry=FAST_RETRY)
    store.save("out", 1)
    cache = StepCache(str(tmp_path))
    key = StepKey("step", {"nodes": "step"})
    assert cache.record(key, nodes=("step",), run_id="r", job_name="job", outputs={"out": store.url("out")})
    fs = fsspec.filesystem("file")
    real_ls = fs.ls

    def failing_ls(path, *args, **kwargs):
        if path.rstrip("/").endswith("kedro-vertexai-temp"):
            raise PermissionError(13, "Permission denied", path)
        return real_ls(path, *args, **kwargs)

    def exists_as_gcsfs(path, **kwargs):  # any failure to look is "no such path"
        try:
            fs.info(path)
            return bool(failing_ls(path)) or True
        except Exception:
            return False

    monkeypatch.setattr(fs, "ls", failing_ls)
    monkeypatch.setattr(fs, "exists", exists_as_gcsfs)
    with pytest.raises(StorageError, match="^could not clean .*Permission denied") as failed:
        collect_garbage(str(tmp_path), WEEK, delete=True)
    assert failed.value.exit_code == ExitCode.INFRASTRUCTURE
    monkeypatch.undo()
    assert cache.lookup(key)[0] is not None


def test_an_entry_whose_blob_the_listing_missed_is_not_dangling(tmp_path: Path, monkeypatch) -> None:
    """The blob is looked up once more before its entry is called dangling: a listing that
    missed it (an eventually consistent store, a job listed short) deletes nothing."""
    from kvx_runtime.cache.key import StepKey
    from kvx_runtime.cache.store import StepCache

    store = BlobStore(str(tmp_path), "job", retry=FAST_RETRY)
    store.save("out", 1)
    cache = StepCache(str(tmp_path))
    key = StepKey("step", {"nodes": "step"})
    assert cache.record(key, nodes=("step",), run_id="r", job_name="job", outputs={"out": store.url("out")})
    monkeypatch.setattr(gc, "_jobs", lambda *args, **kwargs: [])  # listed short: no job at all

    report = collect_garbage(str(tmp_path), WEEK, delete=True)
    assert not report.cache_entries and cache.lookup(key)[0] is not None


@pytest.mark.parametrize("stop", ["error", "SIGTERM"])
def test_a_stop_half_way_says_what_was_deleted_and_which_job_it_left(stop: str, tmp_path: Path, monkeypatch) -> None:
    """An I/O error or SIGTERM while gc deletes the second job's files: the first job is
    reported deleted, the second as possibly partly deleted, and the last line says why (never
    that nothing partial was left)."""
    import signal

    from kvx_runtime.errors import Interrupted

    first, second = old_job(tmp_path, "job-1"), old_job(tmp_path, "job-2", "a", "b")
    real_delete = gc._delete_listed

    def stopped_in_the_second(fs, job, listed):
        if not job.endswith("job-2"):
            return real_delete(fs, job, listed)
        fs.rm(sorted(listed)[:1])
        raise OSError(5, "Input/output error") if stop == "error" else Interrupted(signal.SIGTERM)

    monkeypatch.setattr(gc, "_delete_listed", stopped_in_the_second)
    result = CliRunner().invoke(cli, ["gc", "--storage-root", str(tmp_path), "--older-than", str(WEEK), "--yes"])

    assert result.exit_code == (ExitCode.INFRASTRUCTURE if stop == "error" else ExitCode.TERMINATED), result.output
    lines = result.output.splitlines()
    assert any(line.startswith("deleted job job-1: ") for line in lines)
    assert not any(line.startswith("deleted job job-2") for line in lines)
    assert "stopped while deleting job job-2: some of its files may be gone (gc --yes again finishes it)" in lines
    cause = "the error below" if stop == "error" else "SIGTERM"
    assert f"gc stopped half-way by {cause}: only what is listed above was deleted" in lines
    last = "Input/output error" if stop == "error" else "stopped by SIGTERM: job job-2 may be partly deleted"
    assert last in lines[-1] and "nothing partial" not in result.output
    assert not Path(first.path("a")).exists() and second.load("b") == list(range(100))


def test_an_age_that_is_not_a_number_is_refused(tmp_path: Path) -> None:
    """nan compares false with every age: each job would look expired, a running one included."""
    store = BlobStore(str(tmp_path), "running", retry=FAST_RETRY)
    store.save("a", 1)
    for delete in (False, True):
        with pytest.raises(UsageError, match=r"^gc's age must be a number of seconds \(0 or more\), not nan"):
            collect_garbage(str(tmp_path), float("nan"), delete=delete)
    result = CliRunner().invoke(cli, ["gc", "--storage-root", str(tmp_path), "--older-than", "nan", "--yes"])
    assert result.exit_code == ExitCode.USAGE, result.output
    assert "Traceback" not in result.output and store.load("a") == 1


def test_a_delete_that_fails_half_way_names_the_job_it_left_partly_deleted(tmp_path: Path, monkeypatch) -> None:
    store = old_job(tmp_path, "job", "a", "b", "c")
    fs = fsspec.filesystem("file")
    real_rm = fs.rm

    def two_then_fail(paths, *args, **kwargs):
        real_rm(list(paths)[:2])
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(fs, "rm", two_then_fail)
    result = CliRunner().invoke(cli, ["gc", "--storage-root", str(tmp_path), "--older-than", str(WEEK), "--yes"])

    assert result.exit_code == ExitCode.INFRASTRUCTURE, result.output
    lines = result.output.splitlines()
    assert "stopped while deleting job job: some of its files may be gone (gc --yes again finishes it)" in lines
    assert "gc stopped half-way by the error below: only what is listed above was deleted" in lines
    assert store.load("c") == list(range(100))


def test_a_file_another_gc_deleted_first_does_not_stop_the_delete_of_the_others(tmp_path: Path,
                                                                               monkeypatch) -> None:
    """Two gc runs overlap on a local root: fsspec's local rm stops at the first file already
    gone; the files after it are deleted all the same, and the job is reported deleted."""
    store = old_job(tmp_path, "job", "a", "b", "c")
    fs = fsspec.filesystem("file")
    real_rm = fs.rm

    def someone_else_first(paths, *args, **kwargs):
        os.remove(sorted(paths)[0])
        return real_rm(paths, *args, **kwargs)

    monkeypatch.setattr(fs, "rm", someone_else_first)
    report = collect_garbage(str(tmp_path), WEEK, delete=True)
    assert [name for name, _, _ in report.expired_jobs] == ["job"]
    assert not any(Path(store.path(name)).exists() for name in ("a", "b", "c"))


def test_a_file_written_again_right_after_its_delete_is_no_failed_delete(tmp_path: Path, monkeypatch) -> None:
    """A blob of the same name written between gc's delete and its check (a run reusing an
    expired job's name) is newer than what gc listed: not a file gc failed to delete."""
    store = old_job(tmp_path, "job", "a", "b")
    fs = fsspec.filesystem("file")
    real_rm = fs.rm

    def rm_then_rewritten(paths, *args, **kwargs):
        real_rm(paths, *args, **kwargs)
        store.save("a", "again")

    monkeypatch.setattr(fs, "rm", rm_then_rewritten)
    report = collect_garbage(str(tmp_path), WEEK, delete=True)
    assert [name for name, _, _ in report.expired_jobs] == ["job"]
    assert store.load("a") == "again" and not Path(store.path("b")).exists()


def test_files_deleted_meanwhile_by_someone_else_are_no_failure(tmp_path: Path, monkeypatch) -> None:
    """gcsfs raises "not found" when every file it was asked to delete is already gone (another
    gc, a bucket's lifecycle rule): the job is deleted all the same."""
    store = old_job(tmp_path, "job", "a", "b")
    fs = fsspec.filesystem("file")
    real_rm = fs.rm

    def gone_before_us(paths, *args, **kwargs):
        real_rm(paths)
        raise FileNotFoundError(paths[0])

    monkeypatch.setattr(fs, "rm", gone_before_us)
    report = collect_garbage(str(tmp_path), WEEK, delete=True)
    assert [name for name, _, _ in report.expired_jobs] == ["job"] and report.partly_deleted is None
    assert not Path(store.path("a")).exists()


@pytest.mark.parametrize("where", ["gcs", "s3"])
def test_on_object_stores_expired_jobs_go_and_young_ones_stay(where: str, tmp_path: Path, monkeypatch,
                                                              request: pytest.FixtureRequest) -> None:
    """The job listing (prefixes as directories), the second listing, the delete of its files and
    the check that they are gone, on the GCS emulator and moto's S3 server. An object's time is
    the server's (moto's in whole seconds): one job's is made a month older than it is."""
    if where == "gcs":
        root = f"gs://{request.getfixturevalue('gcs_emulator').bucket}/gc-{tmp_path.name}"
    else:
        root = f"s3://{request.getfixturevalue('s3_server').bucket}/gc-{tmp_path.name}"
    old = BlobStore(root, "old-job", retry=FAST_RETRY)
    old.save("a", 1)
    old.save("b", 2)
    old.note_activity("a step")
    young = BlobStore(root, "young-job", retry=FAST_RETRY)
    young.save("a", 3)
    real_modified = gc._modified

    def old_job_a_month_old(info):  # the server's times, old-job's made a month older
        seconds = real_modified(info)
        return seconds - 30 * 86400 if "/old-job/" in info["name"] else seconds

    monkeypatch.setattr(gc, "_modified", old_job_a_month_old)
    dry = collect_garbage(root, WEEK)
    assert [name for name, _, _ in dry.expired_jobs] == ["old-job"]
    done = collect_garbage(root, WEEK, delete=True)
    assert [name for name, _, _ in done.expired_jobs] == ["old-job"]
    fs = old._fs
    fs.invalidate_cache()
    assert not fs.find(old._base) and young.load("a") == 3


def test_on_s3_a_blob_the_listing_missed_is_asked_of_the_store(tmp_path: Path, s3_server) -> None:
    """s3fs answers a look-up from the listing of the blob's directory that gc has just cached:
    the blob the listing missed is asked of the store itself before its entry is called dangling."""
    from kvx_runtime.cache.key import StepKey
    from kvx_runtime.cache.store import StepCache

    root = f"s3://{s3_server.bucket}/gc-{tmp_path.name}"
    store = BlobStore(root, "job", retry=FAST_RETRY)
    store.save("out", 1)
    store.save("other", 2)
    cache = StepCache(root)
    key = StepKey("step", {"nodes": "step"})
    assert cache.record(key, nodes=("step",), run_id="r", job_name="job", outputs={"out": store.url("out")})
    real_jobs = gc._jobs

    def listed_short(fs, *args, **kwargs):  # the listing, and the cache it filled, missed "out"
        found = real_jobs(fs, *args, **kwargs)
        for entries in fs.dircache.values():
            entries[:] = [entry for entry in entries if not entry["name"].endswith("/out.bin")]
        return [(name, {path: info for path, info in listed.items() if not path.endswith("/out.bin")}, job)
                for name, listed, job in found]

    gc._jobs = listed_short
    try:
        report = collect_garbage(root, WEEK, delete=True)
    finally:
        gc._jobs = real_jobs
    assert not report.cache_entries and cache.lookup(key)[0] is not None
