"""The blob store: object naming, atomic writes, retries, errors that name what is missing."""

from __future__ import annotations

import gc
import os
import threading
from pathlib import Path

import pytest
from fsspec.implementations.memory import MemoryFileSystem

from kvx_runtime.errors import ConfigError, ExitCode, KvxError, StorageAccessError, StorageError
from kvx_runtime.storage.blob import BlobUnpicklable
from kvx_runtime.storage.store import BlobMissing, BlobStore, RetryPolicy, object_name

FAST_RETRY = RetryPolicy(attempts=3, initial_wait=0.0, max_wait=0.0)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("model_input_table", "model_input_table"),
        ("data_science.X_train", "data_science.X_train"),
        ("a/b", "a%2Fb"),
        ("../../etc/passwd", "%2E.%2F..%2Fetc%2Fpasswd"),
        ("..", "%2E."),
        ("100%", "100%25"),
        ("naïve", "na%C3%AFve"),
    ],
)
def test_object_names_are_safe_path_segments(name: str, expected: str) -> None:
    assert object_name(name) == expected
    assert "/" not in object_name(name)


def test_object_names_never_collide() -> None:
    names = ["a/b", "a%2Fb", "a_b", "a.b", ".a", "%2Ea", "x" * 400, "x" * 401]
    encoded = [object_name(n) for n in names]
    assert len(set(encoded)) == len(names)
    assert all(len(e.encode()) <= 200 for e in encoded)


def test_blob_layout_follows_the_plugin_family(tmp_path: Path) -> None:
    store = BlobStore(str(tmp_path), "job-1", retry=FAST_RETRY)
    store.save("data_science.model", {"w": [1, 2]})
    assert (tmp_path / "kedro-vertexai-temp" / "job-1" / "data_science.model.bin").is_file()
    assert store.load("data_science.model") == {"w": [1, 2]}


def test_file_url_and_plain_path_roots_are_the_same_place(tmp_path: Path) -> None:
    BlobStore(f"file://{tmp_path}", "job", retry=FAST_RETRY).save("x", 42)
    assert BlobStore(str(tmp_path), "job", retry=FAST_RETRY).load("x") == 42


def test_failed_write_leaves_neither_blob_nor_temporary_file(tmp_path: Path) -> None:
    store = BlobStore(str(tmp_path), "job", retry=FAST_RETRY)
    store.save("ds", "previous value")
    # Pickling fails after part of the stream was already written.
    with pytest.raises(BlobUnpicklable):
        store.save("ds", ["x" * 1_000_000, threading.Lock()])
    directory = tmp_path / "kedro-vertexai-temp" / "job"
    assert sorted(p.name for p in directory.iterdir()) == ["ds.bin"]
    assert store.load("ds") == "previous value"


def test_missing_blob_names_dataset_path_and_producer(tmp_path: Path) -> None:
    store = BlobStore(str(tmp_path), "job", retry=FAST_RETRY)
    with pytest.raises(BlobMissing) as caught:
        store.load("X_train", producer="data_science.split_data_node")
    message = str(caught.value)
    assert "'X_train'" in message
    assert str(tmp_path / "kedro-vertexai-temp" / "job" / "X_train.bin") in message
    assert "data_science.split_data_node" in message
    assert caught.value.exit_code == ExitCode.USAGE


class FlakyMemoryFileSystem(MemoryFileSystem):
    """A real fsspec filesystem with injected transient failures (nothing on this machine
    can make a real storage service fail on cue)."""

    protocol = "flakymem"

    def __init__(self, failures: int, error: Exception, **kwargs):
        super().__init__(**kwargs)
        self.failures = failures
        self.error = error
        self.calls = 0

    def _open(self, path, mode="rb", **kwargs):
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error
        return super()._open(path, mode, **kwargs)


class ServiceUnavailable(Exception):
    code = 503


@pytest.mark.parametrize(
    "error", [ConnectionResetError("connection reset by peer"), ServiceUnavailable("backend error")]
)
def test_transient_errors_are_retried(error: Exception) -> None:
    fs = FlakyMemoryFileSystem(failures=2, error=error, skip_instance_cache=True)
    fs.store.clear()
    store = BlobStore("memory://root", "job", retry=FAST_RETRY, filesystem=fs)
    store.save("ds", [1, 2, 3])
    assert fs.calls == 3
    assert store.load("ds") == [1, 2, 3]


def test_persistent_failure_is_a_storage_error_with_exit_code_3() -> None:
    fs = FlakyMemoryFileSystem(
        failures=100, error=ConnectionRefusedError("connection refused"), skip_instance_cache=True
    )
    store = BlobStore("memory://root", "job", retry=FAST_RETRY, filesystem=fs)
    with pytest.raises(StorageError, match="after 3 attempts.*ConnectionRefusedError") as caught:
        store.save("ds", 1)
    assert caught.value.exit_code == ExitCode.INFRASTRUCTURE
    assert fs.calls == 3


def test_permission_errors_are_not_retried_and_exit_2(tmp_path: Path) -> None:
    fs = FlakyMemoryFileSystem(failures=100, error=PermissionError("403 forbidden"), skip_instance_cache=True)
    store = BlobStore("memory://root", "job", retry=FAST_RETRY, filesystem=fs)
    with pytest.raises(StorageAccessError, match="refused this step's credentials: PermissionError") as caught:
        store.save("ds", 1)
    assert caught.value.exit_code == ExitCode.USAGE
    assert fs.calls == 1


def test_the_retry_budget_ends_retries_of_storage_that_stays_down() -> None:
    fs = FlakyMemoryFileSystem(failures=10_000, error=ServiceUnavailable("backend error"), skip_instance_cache=True)
    budget = RetryPolicy(attempts=10_000, initial_wait=0.01, max_wait=0.05, budget=0.5)
    store = BlobStore("memory://root", "job", retry=budget, filesystem=fs)
    with pytest.raises(StorageError, match=r"after \d+ attempts in [\d.]+ s \(the retry budget, "
                       r"KVX_STORAGE_RETRY_BUDGET=0.5 s, is spent\): ServiceUnavailable") as caught:
        store.save("ds", 1)
    assert caught.value.exit_code == ExitCode.INFRASTRUCTURE
    assert 1 < fs.calls < 10_000  # retried, then stopped by the budget, not by the attempts


@pytest.mark.parametrize(("name", "value"), [("KVX_STORAGE_RETRY_BUDGET", "soon"), ("KVX_STORAGE_RETRIES", "3.5"),
                                             ("KVX_STORAGE_RETRY_WAIT", "nan")])
def test_bad_retry_settings_are_config_errors_naming_the_variable(monkeypatch, name: str, value: str) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=f"^{name}="):
        RetryPolicy.from_env()


def test_budget_from_the_environment(monkeypatch) -> None:
    monkeypatch.setenv("KVX_STORAGE_RETRY_BUDGET", "12.5")
    assert RetryPolicy.from_env().budget == 12.5
    monkeypatch.delenv("KVX_STORAGE_RETRY_BUDGET")
    assert RetryPolicy.from_env().budget == 90.0


@pytest.mark.parametrize("kind", ["file", "proc"])
def test_a_root_that_cannot_hold_directories_is_exit_2(tmp_path: Path, kind: str) -> None:
    if kind == "file":
        root = tmp_path / "a-file"
        root.write_text("not a directory")
    else:
        root = Path("/proc/self")
    store = BlobStore(str(root), "job", retry=FAST_RETRY)
    with pytest.raises(StorageAccessError, match=f"storage root {root} cannot hold intermediates") as caught:
        store.save("ds", 1)
    assert caught.value.exit_code == ExitCode.USAGE
    with pytest.raises(KvxError) as caught:  # a file in the way: the root; in /proc: no such blob
        store.load("ds")
    assert caught.value.exit_code == ExitCode.USAGE
    assert kind == "proc" or "cannot hold intermediates" in str(caught.value)


def test_remote_blob_roundtrip_on_the_gcs_emulator(gcs_emulator) -> None:
    store = BlobStore(f"gs://{gcs_emulator.bucket}/unit", "job-gcs", retry=FAST_RETRY)
    store.save("frame", {"rows": list(range(1000))})
    fs = gcs_emulator.filesystem()
    assert fs.exists(f"{gcs_emulator.bucket}/unit/kedro-vertexai-temp/job-gcs/frame.bin")
    assert store.load("frame") == {"rows": list(range(1000))}
    with pytest.raises(BlobMissing, match="gs://kvx-test/unit/kedro-vertexai-temp/job-gcs/nope.bin"):
        store.load("nope")


def test_failed_remote_write_is_never_finalized(gcs_emulator) -> None:
    store = BlobStore(f"gs://{gcs_emulator.bucket}/unit", "job-partial", retry=FAST_RETRY)
    # A megabyte is already in the upload buffer when pickling fails: closing the file (as a
    # plain `with fs.open(...)` would) would upload it under the final name. (The emulator
    # does not implement multi-chunk resumable uploads, so the payload stays below one chunk.)
    payload = [os.urandom(1024 * 1024), threading.Lock()]
    with pytest.raises(BlobUnpicklable):
        store.save("partial", payload)
    # gcsfs closes (flushes!) forgotten files in a background thread when they are collected:
    # the abandoned handle must not be one of them.
    gc.collect()
    _wait_for_gcsfs_deferred_closes()
    fs = gcs_emulator.filesystem()
    assert not fs.exists(f"{gcs_emulator.bucket}/unit/kedro-vertexai-temp/job-partial/partial.bin")


def _wait_for_gcsfs_deferred_closes(timeout: float = 10.0) -> None:
    import time

    from gcsfs import core

    queue = getattr(core, "_deferred_close_queue", None)
    if queue is None:
        return
    done = threading.Event()
    queue.put(done.set)  # runs after every close queued before it
    assert done.wait(timeout)
    time.sleep(0.1)


def test_a_valid_blob_of_another_dataset_or_job_is_refused(tmp_path: Path) -> None:
    import shutil

    from kvx_runtime.storage.blob import BlobMismatch

    first = BlobStore(str(tmp_path), "job-1", retry=FAST_RETRY)
    first.save("features", {"x": 1})
    first.save("labels", {"y": 2})
    # A hand copy puts the features blob where the labels blob was: it loads nothing silently.
    shutil.copy(first.path("features"), first.path("labels"))
    with pytest.raises(BlobMismatch, match="holds dataset 'features'") as caught:
        first.load("labels")
    assert caught.value.exit_code == ExitCode.USAGE
    # The right dataset of another run's job directory is refused too.
    other = BlobStore(str(tmp_path), "job-2", retry=FAST_RETRY)
    Path(other.path("features")).parent.mkdir(parents=True)
    shutil.copy(first.path("features"), other.path("features"))
    with pytest.raises(BlobMismatch, match="holds job 'job-1'"):
        other.load("features")
    assert first.load("features") == {"x": 1}


def test_an_abandoned_upload_is_never_finalized_later(gcs_emulator) -> None:
    """gcsfs flushes a forgotten write handle when it is garbage collected (in a background
    thread): an upload abandoned after a failure or a signal must stay abandoned."""
    from kvx_runtime.storage.store import _abandon

    fs = gcs_emulator.filesystem()
    path = f"{gcs_emulator.bucket}/unit/abandoned.bin"
    handle = fs.open(path, "wb", block_size=8 * 1024 * 1024)
    handle.write(os.urandom(1024 * 1024))  # still in the buffer: no upload session yet
    _abandon(handle, path)
    del handle
    gc.collect()
    _wait_for_gcsfs_deferred_closes()
    assert not fs.exists(path)


def _dead_pid() -> int:
    import subprocess
    import sys

    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_the_next_writer_removes_what_dead_writers_left(tmp_path: Path) -> None:
    import time

    from kvx_runtime.storage.store import _host

    store = BlobStore(str(tmp_path), "job", retry=FAST_RETRY)
    directory = Path(store.path("x")).parent
    directory.mkdir(parents=True)
    dead = directory / f".x.bin.{_host()}.{_dead_pid()}.{'a' * 32}.tmp"
    alive = directory / f".y.bin.{_host()}.{os.getpid()}.{'b' * 32}.tmp"
    elsewhere_fresh = directory / f".z.bin.other-host.123.{'c' * 32}.tmp"
    elsewhere_old = directory / f".w.bin.other-host.123.{'d' * 32}.tmp"
    legacy_old = directory / f".v.bin.{'e' * 32}.tmp"  # written before writers were named
    for path in (dead, alive, elsewhere_fresh, elsewhere_old, legacy_old):
        path.write_bytes(b"partial")
    week_ago = time.time() - 7 * 86400
    for path in (elsewhere_old, legacy_old):
        os.utime(path, (week_ago, week_ago))
    store.save("x", 1)
    assert sorted(p.name for p in directory.iterdir()) == sorted([alive.name, elsewhere_fresh.name, "x.bin"])
    assert store.load("x") == 1


def test_gc_lists_then_deletes_expired_jobs_and_dead_writers_files(tmp_path: Path) -> None:
    import time

    from kvx_runtime.storage.gc import collect_garbage, describe
    from kvx_runtime.storage.store import _host

    old, recent = BlobStore(str(tmp_path), "old-job"), BlobStore(str(tmp_path), "recent-job")
    old.save("a", list(range(1000)))
    recent.save("a", 1)
    leftover = Path(recent.path("a")).parent / f".b.bin.{_host()}.{_dead_pid()}.{'f' * 32}.tmp"
    leftover.write_bytes(b"partial")
    month_ago = time.time() - 30 * 86400
    os.utime(old.path("a"), (month_ago, month_ago))

    dry = collect_garbage(str(tmp_path), max_age=7 * 86400)
    assert [job for job, _, _ in dry.expired_jobs] == ["old-job"] and dry.temp_files == [f"recent-job/{leftover.name}"]
    assert Path(old.path("a")).exists() and leftover.exists()  # a dry run deletes nothing
    assert describe(dry)[-1].endswith("(dry run: pass --yes to delete)")

    done = collect_garbage(str(tmp_path), max_age=7 * 86400, delete=True)
    assert done.deleted and not Path(old.path("a")).parent.exists() and not leftover.exists()
    assert recent.load("a") == 1



@pytest.mark.parametrize("where", ["local", "gcs"])
def test_gc_deletes_cache_entries_that_can_never_hit_again_and_keeps_the_others(
        where: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """An entry past the ttl (by its ``created``) and one whose blob is gone go, with their
    steps' records; a recent one, its job, and an entry of a format this version cannot read
    (recent) stay. On GCS as on a local disk."""
    import json
    from datetime import datetime, timedelta, timezone

    from kvx_runtime.cache.key import StepKey
    from kvx_runtime.cache.store import StepCache
    from kvx_runtime.storage.gc import collect_garbage, describe

    if where == "gcs":
        root = f"gs://{request.getfixturevalue('gcs_emulator').bucket}/gc-{tmp_path.name}"
    else:
        root = str(tmp_path)
    cache = StepCache(root)
    keys = {}
    for step in ("live", "old", "lost"):
        store = BlobStore(root, f"job-{step}", retry=FAST_RETRY)
        store.save("out", step)
        keys[step] = StepKey(step, {"nodes": step})
        assert cache.record(keys[step], nodes=(step,), run_id=step, job_name=store.job_name,
                            outputs={"out": store.url("out")}) is not None
    fs = cache._fs
    old_entry = f"{cache._base}/entries/{keys['old'].digest}.json"
    month_ago = (datetime.now(timezone.utc) - timedelta(days=30)).isoformat()
    fs.pipe_file(old_entry, json.dumps({**json.loads(fs.cat_file(old_entry)), "created": month_ago}).encode())
    fs.rm(BlobStore(root, "job-lost").path("out"))
    future = f"{cache._base}/entries/{'f' * 64}.json"
    fs.pipe_file(future, b'{"format": 99}')

    dry = collect_garbage(root, max_age=7 * 86400)
    assert sorted((step, key, why) for key, step, _, why in dry.cache_entries) == [
        ("lost", keys["lost"].digest, "dangling: the blob out of job job-lost is gone"),
        ("old", keys["old"].digest, "expired: recorded 30.0 days ago")]
    assert sorted(name for name, _ in dry.step_records) == ["lost.json", "old.json"]
    assert not dry.expired_jobs and not dry.kept_jobs  # the jobs' blobs are recent
    assert dry.bytes == sum(size for _, _, size, _ in dry.cache_entries) + sum(size for _, size in dry.step_records) > 0
    assert "0 expired job(s), 2 cache entries" in describe(dry)[-1]
    assert cache.lookup(keys["old"])[0] is not None  # a dry run deletes nothing

    done = collect_garbage(root, max_age=7 * 86400, delete=True)
    assert done.deleted and [key for key, *_ in done.cache_entries] == [key for key, *_ in dry.cache_entries]
    fs.invalidate_cache()
    assert sorted(path.rsplit("/", 1)[1] for path in fs.ls(f"{cache._base}/entries", detail=False)) == sorted(
        [f"{keys['live'].digest}.json", f"{'f' * 64}.json"])
    assert cache.lookup(keys["live"])[0] is not None and cache.last_key("live") is not None
    assert cache.last_key("old") is None and cache.last_key("lost") is None
    assert cache.lookup(keys["old"]) == (None, "no entry for this key")
    assert BlobStore(root, "job-old").load("out") == "old"  # its job is recent: it stays
    assert collect_garbage(root, max_age=7 * 86400, delete=True).cache_entries == []


def test_gc_leaves_an_entry_recorded_again_since_it_was_read(tmp_path: Path) -> None:
    """A run that records the key again between gc's read and its delete wrote a fresh entry:
    gc removes a file only if it is still what it read."""
    from kvx_runtime.cache.key import StepKey
    from kvx_runtime.cache.store import StepCache

    store = BlobStore(str(tmp_path), "job")
    store.save("out", 1)
    cache = StepCache(str(tmp_path))
    key = StepKey("s", {"nodes": "s"})
    cache.record(key, nodes=("s",), run_id="r1", job_name="job", outputs={"out": store.url("out")})
    [read] = cache.index("entries")
    assert read.entry is not None and read.entry.run_id == "r1"
    cache.record(key, nodes=("s",), run_id="r2", job_name="job", outputs={"out": store.url("out")})
    assert not cache.remove(read)
    assert cache.lookup(key)[0].run_id == "r2"  # type: ignore[union-attr]
    [again] = cache.index("entries")
    assert cache.remove(again) and cache.lookup(key) == (None, "no entry for this key")
    assert not cache.remove(again)  # already gone


@pytest.mark.parametrize("damage", ["null", "[1, 2]", '"text"', '{"format": 1, "outputs": []}',
                                    '{"format": 1, "key": "k", "step": "s", "nodes": "s", "run_id": "r", '
                                    '"job_name": "j", "created": "c", "parts": {}, "outputs": {"out": {}}}'])
def test_an_index_file_of_valid_json_but_another_shape_is_unreadable_never_a_crash(tmp_path, damage) -> None:
    # A hand edit or another tool's file: a miss for the step, skipped by gc's reading; never
    # an AttributeError/KeyError that fails the step or plan on every run.
    from kvx_runtime.cache.key import StepKey
    from kvx_runtime.cache.store import CACHE_DIR, StepCache

    cache = StepCache(str(tmp_path))
    key = StepKey("s", {"nodes": "s"})
    entry = tmp_path / CACHE_DIR / "entries" / f"{key.digest}.json"
    entry.parent.mkdir(parents=True)
    entry.write_text(damage)
    assert cache.lookup(key) == (None, "no entry for this key")
    [read] = cache.index("entries")
    assert read.entry is None


# --- s3:// (moto's S3 server on 127.0.0.1) ---------------------------------------------------


def test_remote_blob_roundtrip_on_s3_single_put_and_multipart(s3_server) -> None:
    store = BlobStore(f"s3://{s3_server.bucket}/unit", "job-s3", retry=FAST_RETRY)
    small = {"rows": list(range(100))}
    large = os.urandom(12 * 1024 * 1024)  # incompressible: three 5 MiB parts at least
    store.save("small", small)
    store.save("large", large)
    fs = s3_server.filesystem()
    assert fs.exists(f"{s3_server.bucket}/unit/kedro-vertexai-temp/job-s3/small.bin")
    assert store.url("large") == f"s3://{s3_server.bucket}/unit/kedro-vertexai-temp/job-s3/large.bin"
    assert store.load("small") == small
    assert store.load("large") == large


def test_failed_s3_multipart_write_is_aborted_never_completed(s3_server) -> None:
    """Pickling fails after parts were uploaded: no object, and no multipart upload left open
    (S3 would keep charging for its parts)."""
    store = BlobStore(f"s3://{s3_server.bucket}/unit", "job-s3-partial", retry=FAST_RETRY)
    payload = [os.urandom(11 * 1024 * 1024), threading.Lock()]
    with pytest.raises(BlobUnpicklable):
        store.save("partial", payload)
    gc.collect()
    key = "unit/kedro-vertexai-temp/job-s3-partial/partial.bin"
    assert not s3_server.filesystem().exists(f"{s3_server.bucket}/{key}")
    uploads = s3_server.client().list_multipart_uploads(Bucket=s3_server.bucket, Prefix=key).get("Uploads", [])
    assert uploads == []


def test_s3_errors_are_classified_by_their_http_status() -> None:
    from botocore.exceptions import ClientError
    from s3fs.errors import translate_boto_error

    from kvx_runtime.storage.store import is_transient

    def error(code: str, status: int) -> OSError:
        cause = ClientError({"Error": {"Code": code, "Message": code},
                             "ResponseMetadata": {"HTTPStatusCode": status}}, "PutObject")
        return translate_boto_error(cause)

    assert is_transient(error("SlowDown", 503))
    assert is_transient(error("InternalError", 500))
    assert not is_transient(error("AccessDenied", 403))
    assert not is_transient(error("InvalidBucketName", 400))


def test_a_missing_s3_bucket_is_not_reported_as_a_missing_blob(s3_server) -> None:
    store = BlobStore("s3://kvx-no-such-bucket/unit", "job", retry=FAST_RETRY)
    for operation in (lambda: store.load("ds"), lambda: store.save("ds", [1, 2])):
        with pytest.raises(ConfigError, match="bucket 'kvx-no-such-bucket' of storage root "
                           "s3://kvx-no-such-bucket/unit does not exist") as caught:
            operation()
        assert caught.value.exit_code == ExitCode.USAGE


def test_run_config_s3_endpoint_is_used_when_no_aws_variable_names_one(s3_server, monkeypatch) -> None:
    import fsspec.config

    from kvx_runtime.storage.store import configure_s3

    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)
    monkeypatch.delenv("AWS_REGION", raising=False)
    monkeypatch.setitem(fsspec.config.conf, "s3", {})
    configure_s3(s3_server.url, "us-east-1")
    assert fsspec.config.conf["s3"] == {"endpoint_url": s3_server.url, "client_kwargs": {"region_name": "us-east-1"}}
    store = BlobStore(f"s3://{s3_server.bucket}/configured", "job-conf", retry=FAST_RETRY)
    store.save("ds", {"a": 1})
    assert s3_server.filesystem().exists(f"{s3_server.bucket}/configured/kedro-vertexai-temp/job-conf/ds.bin")

    # The standard variable wins over the project's configuration.
    monkeypatch.setitem(fsspec.config.conf, "s3", {})
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.url)
    configure_s3("http://127.0.0.1:9", None)
    assert "endpoint_url" not in fsspec.config.conf["s3"]


def test_a_project_opened_after_another_keeps_none_of_its_s3_defaults(monkeypatch) -> None:
    import fsspec.config

    from kvx_runtime.storage import store
    from kvx_runtime.storage.store import configure_s3

    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_REGION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(store, "_S3_APPLIED", {})
    monkeypatch.setitem(fsspec.config.conf, "s3", {})
    configure_s3("http://minio-service.kubeflow:9000", "eu-west-1", replace=True)  # a kubeflow.yml project
    configure_s3(None, None, replace=True)  # then one without run_config.s3
    assert fsspec.config.conf["s3"] == {}

    # A project's values replace an earlier project's; a default set by someone else stays.
    fsspec.config.conf["s3"] = {"client_kwargs": {"region_name": "us-east-2", "verify": False}}
    configure_s3("http://first:9000", "eu-west-1", replace=True)
    configure_s3("http://second:9000", None, replace=True)
    assert fsspec.config.conf["s3"] == {"endpoint_url": "http://second:9000",
                                        "client_kwargs": {"region_name": "us-east-2", "verify": False}}

    # Defaults the step's environment names (without replace) add to the project's, never take it back.
    configure_s3(None, "ap-south-1")
    assert fsspec.config.conf["s3"]["endpoint_url"] == "http://second:9000"

    # ... and a project opened after them (its run_config.s3 empty there) keeps them.
    fsspec.config.conf["s3"] = {}
    configure_s3("http://from-the-step-env:9000", "eu-central-1")
    configure_s3(None, None, replace=True)
    assert fsspec.config.conf["s3"] == {"endpoint_url": "http://from-the-step-env:9000",
                                        "client_kwargs": {"region_name": "eu-central-1"}}


def test_a_root_whose_filesystem_is_not_installed_says_which_extra_to_install(monkeypatch) -> None:
    import fsspec.core

    def missing(url: str, **_: object) -> None:
        raise ImportError("Install s3fs to access S3")

    monkeypatch.setattr(fsspec.core, "url_to_fs", missing)
    with pytest.raises(ConfigError, match="Install s3fs to access S3") as caught:
        BlobStore("s3://bucket/prefix", "job")
    assert 'pip install "kvx-runtime[s3]"' in str(caught.value)
    assert caught.value.exit_code == ExitCode.USAGE


def _store_on(backend: str, tmp_path: Path, request: pytest.FixtureRequest, job: str) -> BlobStore:
    if backend == "local":
        return BlobStore(str(tmp_path / "root"), job, retry=FAST_RETRY)
    server = request.getfixturevalue("s3_server" if backend == "s3" else "gcs_emulator")
    scheme = "s3" if backend == "s3" else "gs"
    return BlobStore(f"{scheme}://{server.bucket}/records-{tmp_path.name}", job, retry=FAST_RETRY)


@pytest.mark.parametrize("backend", ["local", "s3", "gcs"])
def test_a_record_keeps_what_its_first_writer_wrote(backend: str, tmp_path: Path, request) -> None:
    store = _store_on(backend, tmp_path, request, "job-records")
    assert store.first_record("run-version.json", b"first") == b"first"
    assert store.first_record("run-version.json", b"second") == b"first"
    assert _store_on(backend, tmp_path, request, "job-records").first_record("run-version.json", b"x") == b"first"
    assert store.first_record("other.json", b"other") == b"other"
    if backend == "local":
        job_dir = tmp_path / "root" / "kedro-vertexai-temp" / "job-records"
        assert sorted(p.name for p in job_dir.iterdir()) == ["other.json", "run-version.json"]  # no temp files


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_concurrent_first_writers_all_read_one_record(backend: str, tmp_path: Path, request) -> None:
    """Steps of one run starting together: whoever creates the record first, all agree on it.
    (The GCS emulator ignores ifGenerationMatch, so GCS is covered by the sequential test.)"""
    from concurrent.futures import ThreadPoolExecutor

    writers = 6
    for record in range(5):
        store = _store_on(backend, tmp_path, request, f"job-race-{record}")
        barrier = threading.Barrier(writers)

        def write(writer: int, store: BlobStore = store, barrier: threading.Barrier = barrier) -> bytes:
            barrier.wait()
            return store.first_record("run-version.json", f"writer-{writer}".encode())

        with ThreadPoolExecutor(writers) as pool:
            seen = {future.result() for future in [pool.submit(write, w) for w in range(writers)]}
        assert len(seen) == 1, seen


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_a_writer_that_looked_before_the_first_write_does_not_overwrite(
    backend: str, tmp_path: Path, request, monkeypatch
) -> None:
    """The interleaving the conditional create exists for: a second step found no record, then
    the first step created it; the second step's create must fail and it must read the first's.
    (S3's If-None-Match here is moto's, as AWS S3 and MinIO honour it.)"""
    store = _store_on(backend, tmp_path, request, "job-interleaved")
    assert store.first_record("run-version.json", b"first") == b"first"
    real_cat = store._fs.cat_file
    looked: list[str] = []

    def stale_first_look(path: str, *args, **kwargs):
        if not looked:
            looked.append(path)
            raise FileNotFoundError(path)  # what it saw before the first writer's create
        return real_cat(path, *args, **kwargs)

    monkeypatch.setattr(store._fs, "cat_file", stale_first_look)
    assert store.first_record("run-version.json", b"late") == b"first"
    assert looked and real_cat(looked[0]) == b"first"


def test_gc_on_an_unreachable_store_is_one_line_and_exit_3(monkeypatch) -> None:
    import fsspec.config

    from kvx_runtime.storage.gc import collect_garbage

    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    monkeypatch.setitem(fsspec.config.conf, "s3", {"endpoint_url": "http://127.0.0.1:9"})
    with pytest.raises(StorageError, match=r"^could not clean s3://kvx-gc/x: EndpointConnectionError") as failed:
        collect_garbage("s3://kvx-gc/x", 0)
    assert failed.value.exit_code == ExitCode.INFRASTRUCTURE


def test_an_s3_store_that_ignores_conditional_writes_is_refused(s3_server, tmp_path: Path, monkeypatch) -> None:
    """A store that overwrites where it should refuse (older S3-compatible servers): simulated
    by dropping s3fs's If-None-Match on the real moto server. Two steps could otherwise each
    keep their own run version; the record is refused before it is written."""
    store = BlobStore(f"s3://{s3_server.bucket}/ignores-{tmp_path.name}", "job", retry=FAST_RETRY)
    real_pipe = store._fs.pipe_file
    monkeypatch.setattr(store._fs, "pipe_file", lambda path, data, mode="overwrite", **kw: real_pipe(path, data, **kw))
    with pytest.raises(ConfigError, match="ignores conditional writes") as refused:
        store.first_record("run-version.json", b"first")
    assert refused.value.exit_code == ExitCode.USAGE
    fs = s3_server.filesystem()
    assert fs.find(f"{s3_server.bucket}/ignores-{tmp_path.name}") == []  # neither record nor probe


def test_a_remote_output_rewritten_while_it_is_served_is_never_this_runs(gcs_emulator) -> None:
    from kvx_runtime.cache.key import StepKey
    from kvx_runtime.cache.store import StepCache

    root = f"gs://{gcs_emulator.bucket}/served"
    fs = gcs_emulator.filesystem()
    source, copy, late = f"{root}/run-a/out.txt", f"{root}/run-b/out.txt", f"{root}/run-c/out.txt"
    fs.pipe(source.removeprefix("gs://"), b"first")
    cache = StepCache(root)
    entry = cache.record(StepKey("s", {"nodes": "s"}), nodes=("s",), run_id="a", job_name="a",
                         outputs={"out": source})
    assert entry is not None
    assert cache.serve(entry, {"out": copy}) == ["out"]
    assert fs.cat(copy.removeprefix("gs://")) == b"first"
    # Rewritten between the lookup and the copy: the copy is removed and the step runs.
    fs.pipe(source.removeprefix("gs://"), b"second")
    with pytest.raises(ValueError, match="changed while it was served"):
        cache.serve(entry, {"out": late})
    assert not fs.exists(late.removeprefix("gs://"))


def test_an_output_that_cannot_be_checked_is_a_miss_saying_why_not_that_it_changed(tmp_path) -> None:
    from kvx_runtime.cache.key import StepKey
    from kvx_runtime.cache.store import StepCache

    cache = StepCache(str(tmp_path))
    key = StepKey("s", {"nodes": "s"})
    cache.record(key, nodes=("s",), run_id="r1", job_name="job", outputs={"out": "kvx-no-such-store://b/out.csv"},
                 as_saved={"out": ("digest", None)})
    entry, reason = cache.lookup(key)
    assert entry is None and "cannot be checked" in reason and "changed or is gone" not in reason
