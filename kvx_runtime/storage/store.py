"""Where intermediate blobs live: ``<root>/kedro-vertexai-temp/<job name>/<dataset>.bin``.

The layout is the kedro-vertexai family's, so tooling that looks for it keeps working. Access
goes through fsspec (gcsfs for ``gs://``, s3fs for ``s3://`` (S3, MinIO), the local filesystem
for paths and ``file://``); the cloud libraries are imported only when such a root is used.

Guarantees:

- readers never see a partial blob under its final name: local writes go to a temporary file
  in the same directory and are renamed; remote writes are single uploads (GCS resumable
  uploads, S3 PUTs or multipart uploads) that are discarded (never finalized) when anything
  fails, and checked against what was sent when the answer to the finalizing request is lost;
- transient storage errors (HTTP 408/429/5xx, connection resets, timeouts) are retried with
  exponential backoff and jitter (tenacity); what still fails is a :class:`StorageError`
  (exit code 3);
- dataset names map to object names injectively and without path traversal.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from kvx_runtime import failures, settings
from kvx_runtime.errors import ConfigError, InputDataError, KvxError, StorageAccessError, StorageError
from kvx_runtime.log import get_logger
from kvx_runtime.storage.blob import BlobInfo, BlobMismatch, read_blob, write_blob

__all__ = [
    "ACTIVITY_DIR",
    "S3_ENDPOINT_ENV",
    "S3_REGION_ENV",
    "TEMP_DIR",
    "BlobMissing",
    "BlobStore",
    "RetryPolicy",
    "blob_url",
    "configure_s3",
    "job_directory_url",
    "object_name",
]

log = get_logger(__name__)
T = TypeVar("T")

TEMP_DIR = "kedro-vertexai-temp"
#: Where a job's running steps record that they are alive (:meth:`BlobStore.note_activity`).
ACTIVITY_DIR = "activity"
SUFFIX = ".bin"
_SAFE = re.compile(r"[A-Za-z0-9_.\-]")
_MAX_NAME = 180  # bytes; leaves room under the 255-byte file name limit of local disks
_S3_MIN_PART = 5 * 1024 * 1024


def block_size() -> int:
    """Upload/download chunk size for remote roots (``KVX_STORAGE_BLOCK_SIZE`` bytes, 16 MiB)."""
    return settings.STORAGE_BLOCK_SIZE.get()


def _level_from_env() -> int:
    """``KVX_BLOB_LEVEL`` (zstd level 1-19) or the default."""
    return settings.BLOB_LEVEL.get()


class BlobMissing(InputDataError):
    """An upstream blob does not exist (the producing step did not run, or another root)."""


def object_name(name: str) -> str:
    """Map a dataset or job name to one safe path segment, injectively.

    Characters outside ``[A-Za-z0-9_.-]`` become ``%XX`` (``%`` itself too, so two different
    names never collide); a leading dot is escaped (no ``.``, ``..`` or hidden files); names
    too long for a file system keep a readable prefix plus a hash of the full name.
    """
    if not name:
        raise ValueError("empty name")
    encoded = "".join(
        ch if _SAFE.match(ch) else "".join(f"%{b:02X}" for b in ch.encode("utf-8")) for ch in name
    )
    if encoded.startswith("."):
        encoded = "%2E" + encoded[1:]
    if len(encoded.encode()) > _MAX_NAME:
        digest = hashlib.sha256(name.encode("utf-8")).hexdigest()[:16]
        encoded = f"{encoded[: _MAX_NAME - 18]}~{digest}"
    return encoded


@dataclass(frozen=True)
class RetryPolicy:
    """Retries of a whole blob read or write after a transient error, within a give-up budget.

    gcsfs and botocore also retry each HTTP request; these retries restart the whole streamed
    operation, which also covers a connection lost mid-stream. ``budget`` bounds the whole
    operation, both layers included: no retry starts (and no gcsfs backoff) that would end past
    it, so storage that is down for good is reported within the budget plus one request.
    """

    attempts: int = settings.STORAGE_RETRIES.default
    initial_wait: float = settings.STORAGE_RETRY_WAIT.default
    max_wait: float = 30.0
    budget: float = settings.STORAGE_RETRY_BUDGET.default

    @classmethod
    def from_env(cls) -> RetryPolicy:
        """``KVX_STORAGE_RETRIES``, ``KVX_STORAGE_RETRY_WAIT`` and ``KVX_STORAGE_RETRY_BUDGET``
        (seconds) override the defaults; a value that is not a number is a ConfigError."""
        return cls(attempts=settings.STORAGE_RETRIES.get(), initial_wait=settings.STORAGE_RETRY_WAIT.get(),
                   budget=settings.STORAGE_RETRY_BUDGET.get())


class UploadNotFinalized(Exception):
    """A remote write whose finalization failed and whose object is not what was sent: the
    whole write is retried."""


class _ChecksummedSink:
    """Passes writes through to an upload, keeping their count, MD5 and last bytes, so that a
    finalization whose answer was lost can be checked against what GCS holds."""

    _TAIL = 64

    def __init__(self, target: Any) -> None:
        self._target = target
        self.md5 = hashlib.md5(usedforsecurity=False)
        self.count = 0
        self.tail = b""

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self.md5.update(view)
        self.count += view.nbytes
        self.tail = (self.tail + bytes(view[-self._TAIL:]))[-self._TAIL:]
        return int(self._target.write(view) or view.nbytes)


class CreateConflict(Exception):
    """A conditional create that met another in flight (AWS S3: 409 ConditionalRequestConflict,
    to be retried)."""


def is_transient(exc: BaseException) -> bool:
    """Is ``exc`` worth retrying? The shared rule (:mod:`kvx_runtime.failures`), plus the blob
    store's own retryable outcomes."""
    return isinstance(exc, (UploadNotFinalized, CreateConflict)) or failures.is_transient(exc)


#: ``run_config.s3`` as compiled into every step's environment (read before the project's config).
S3_ENDPOINT_ENV = settings.S3_ENDPOINT_URL.name
S3_REGION_ENV = settings.S3_REGION.name


#: What :func:`configure_s3` put in fsspec's ``s3`` defaults for the project opened last
#: (``endpoint_url``, ``region_name``); what the step's environment set is not in it.
_S3_APPLIED: dict[str, str] = {}


def configure_s3(endpoint_url: str | None, region: str | None, *, replace: bool = False) -> None:
    """Defaults for every ``s3://`` filesystem fsspec makes in this process (the blob store's and
    the Kedro datasets'), from ``run_config.s3``; the standard AWS variables win, and so do
    defaults set by someone else. ``replace`` (a project opened): what an earlier call set is
    taken back first, so that a process opening one project after another (a notebook, a
    service) keeps none of an earlier project's endpoint."""
    if not (endpoint_url or region or (replace and _S3_APPLIED)):
        return
    import fsspec.config

    defaults = fsspec.config.conf.setdefault("s3", {})
    client = defaults.get("client_kwargs")
    if replace:
        if "endpoint_url" in _S3_APPLIED and defaults.get("endpoint_url") == _S3_APPLIED["endpoint_url"]:
            del defaults["endpoint_url"]
        if "region_name" in _S3_APPLIED and isinstance(client, dict) \
                and client.get("region_name") == _S3_APPLIED["region_name"]:
            del client["region_name"]
            if not client:
                del defaults["client_kwargs"]
        _S3_APPLIED.clear()
    # Only a project's values are taken back later: the step's environment (KVX_S3_*, set by
    # the compiler from the laptop's resolved config) stays for the process's life.
    applied = _S3_APPLIED if replace else {}
    if endpoint_url and "endpoint_url" not in defaults \
            and not (os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")):
        defaults["endpoint_url"] = applied["endpoint_url"] = endpoint_url
    if region and not (os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")):
        client = defaults.setdefault("client_kwargs", {})
        if "region_name" not in client:
            client["region_name"] = applied["region_name"] = region


def _filesystem(root: str) -> tuple[Any, str]:
    """fsspec filesystem and root path for ``root`` (imports gcsfs/s3fs only for their roots)."""
    import fsspec

    if root.startswith(("gs://", "gcs://")):
        # Without this, gcsfs probes for hierarchical-namespace buckets on every call; against
        # the emulator (and in a sandbox) that probe hangs for a minute.
        os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
        from kvx_runtime.storage.gcs import bound_stalled_requests, check_credentials_file, install_request_retry_policy

        check_credentials_file()  # gcsfs would fall back to anonymous access without a word
        install_request_retry_policy()
        bound_stalled_requests()
    if root.startswith("file://"):
        root = root[len("file://") :]
    if root.startswith(("s3://", "s3a://")):
        # What the compiler put in the step's environment from run_config.s3: code archives
        # and `gc` reach the store before (or without) reading the project's config.
        configure_s3(settings.S3_ENDPOINT_URL.get() or None, settings.S3_REGION.get() or None)
    try:
        fs, path = fsspec.core.url_to_fs(root)
    except ImportError as exc:  # fsspec: "Install s3fs to access S3" and the like
        extra = "s3" if root.startswith(("s3://", "s3a://")) else None
        raise ConfigError(f"storage root {root[:80]}: {str(exc).splitlines()[0][:160]}",
                          hint=f'pip install "kvx-runtime[{extra}]"' if extra else None) from None
    return fs, path.rstrip("/")


def _is_local(fs: Any) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in {"file", "local"}


#: A temporary file of a local write: ``.<blob>.<host>.<pid>.<random>.tmp``.
_TEMP_FILE = re.compile(r"^\.(?P<blob>.+?)(?:\.(?P<host>[A-Za-z0-9_-]+)\.(?P<pid>\d+))?\.[0-9a-f]{32}\.tmp$")
#: After this long without a write, a temporary file's writer is taken for dead whatever its pid.
_TEMP_MAX_AGE = 6 * 3600.0


def _host() -> str:
    import socket

    return re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname())[:60] or "host"


def temp_name(blob: str) -> str:
    """Temporary file name of a local write, naming its writer (host and pid)."""
    return f".{blob}.{_host()}.{os.getpid()}.{uuid.uuid4().hex}.tmp"


def write_file_whole(fs: Any, path: str, data: bytes) -> None:
    """A small file at ``path`` whole or not at all: on a local disk a temporary file (named by
    :func:`temp_name`, so that a dead writer's is swept) renamed into place, its directory made
    by the caller; one upload (a single object creation) on GCS and S3."""
    if not _is_local(fs):
        fs.pipe_file(path, data)
        return
    directory, name = os.path.split(path)
    temporary = os.path.join(directory, temp_name(name))
    try:
        with open(temporary, "wb") as handle:
            handle.write(data)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def _writer_alive(host: str | None, pid: str | None) -> bool | None:
    """True/False for a writer on this host; None when it cannot be told (another host)."""
    if host is None or pid is None or host != _host():
        return None
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True
    return True


def sweep_temp_files(directory: str, *, max_age: float = _TEMP_MAX_AGE, dry_run: bool = False) -> list[str]:
    """Remove the temporary files in ``directory`` whose writer is dead: gone from this host,
    or silent for ``max_age`` seconds. Returns their names."""
    now = time.time()
    removed = []
    for entry in os.scandir(directory):
        match = _TEMP_FILE.match(entry.name)
        if not match or not entry.is_file(follow_symlinks=False):
            continue
        alive = _writer_alive(match.group("host"), match.group("pid"))
        try:
            stale = now - entry.stat(follow_symlinks=False).st_mtime > max_age
        except FileNotFoundError:  # its writer just finished
            continue
        if alive is False or stale:  # stale: even a live pid may be a reused one
            if not dry_run:
                try:
                    os.unlink(entry.path)
                except FileNotFoundError:
                    continue
            removed.append(entry.name)
    return sorted(removed)


def job_directory_url(root: str, job_name: str) -> str:
    """A run's job directory under ``root``, as a user would type it."""
    return f"{root.rstrip('/')}/{TEMP_DIR}/{object_name(job_name)}"


def blob_url(root: str, job_name: str, dataset: str) -> str:
    """Where the run's blob of ``dataset`` is under ``root``, as a user would type it."""
    return f"{job_directory_url(root, job_name)}/{object_name(dataset)}{SUFFIX}"


class BlobStore:
    """Blobs of one pipeline run: ``<root>/kedro-vertexai-temp/<job name>/``."""

    def __init__(
        self,
        root: str,
        job_name: str,
        *,
        retry: RetryPolicy | None = None,
        level: int | None = None,
        filesystem: Any = None,
    ) -> None:
        self.root = root
        self.job_name = job_name
        self.retry = retry or RetryPolicy.from_env()
        self.level = level if level is not None else _level_from_env()
        if filesystem is not None:
            self._fs, base = filesystem, root.rstrip("/")
        else:
            self._fs, base = _filesystem(root)
        self._base = f"{base}/{TEMP_DIR}/{object_name(job_name)}"
        self._display_root = root.rstrip("/")
        self._swept = False
        self._conditional_create_checked = False

    # --- naming -------------------------------------------------------------------------

    def path(self, dataset: str) -> str:
        """Filesystem path of ``dataset``'s blob (as fsspec sees it)."""
        return f"{self._base}/{object_name(dataset)}{SUFFIX}"

    @property
    def job_url(self) -> str:
        """The job directory, as a user would type it (``gs://...``, ``s3://...`` or a local path)."""
        return job_directory_url(self._display_root, self.job_name)

    def url(self, dataset: str) -> str:
        """Where ``dataset``'s blob is, as a user would type it."""
        return blob_url(self._display_root, self.job_name, dataset)

    # --- operations ---------------------------------------------------------------------

    def save(self, dataset: str, obj: Any) -> BlobInfo:
        """Store ``obj`` as ``dataset``'s blob, atomically, retrying transient errors."""
        started = time.perf_counter()
        info = self._retrying(f"write {self.url(dataset)}", lambda: self._write(dataset, obj))
        log.info(
            "blob written",
            dataset=dataset,
            path=self.url(dataset),
            bytes=info.stored_bytes,
            pickled_bytes=info.pickled_bytes,
            seconds=round(time.perf_counter() - started, 3),
        )
        return info

    def load(self, dataset: str, *, producer: str | None = None) -> Any:
        """Load ``dataset``'s blob; a missing one names the node that should have made it."""
        started = time.perf_counter()
        obj, info = self._retrying(
            f"read {self.url(dataset)}", lambda: self._read(dataset, producer)
        )
        log.info(
            "blob read",
            dataset=dataset,
            path=self.url(dataset),
            bytes=info.stored_bytes,
            pickled_bytes=info.pickled_bytes,
            seconds=round(time.perf_counter() - started, 3),
        )
        return obj

    def exists(self, dataset: str) -> bool:
        return bool(self._retrying(f"check {self.url(dataset)}", lambda: self._fs.exists(self.path(dataset))))

    def check_writable(self) -> None:
        """Write and delete a probe object (used by ``doctor``)."""
        probe = f"{self._base}/.kvx-probe-{uuid.uuid4().hex}"

        def attempt() -> None:
            self._fs.makedirs(self._base, exist_ok=True)
            self._fs.pipe_file(probe, b"ok")
            self._fs.rm_file(probe)

        self._retrying(f"write a probe object under {self._display_root}", attempt)

    def first_record(self, name: str, content: bytes) -> bytes:
        """The job's small record ``name``: written with ``content`` if absent, else left as the
        first writer wrote it. Returns what the record holds, so that concurrent steps of one
        run agree. The create is conditional (``ifGenerationMatch=0`` on GCS, ``If-None-Match``
        on S3, a hard link locally), and a retry after a lost answer reads what it wrote."""
        path = f"{self._base}/{name}"

        def attempt() -> bytes:
            try:
                return bytes(self._fs.cat_file(path))
            except FileNotFoundError:
                pass
            if _is_local(self._fs):
                self._create_local(path, content)
            else:
                self._require_conditional_create()
                try:
                    self._fs.pipe_file(path, content, mode="create")
                except FileExistsError:
                    pass  # another step of the run was first
                except OSError as exc:
                    if failures.http_status(exc) == 409:
                        raise CreateConflict(str(exc)) from exc
                    raise
            return bytes(self._fs.cat_file(path))

        return self._retrying(f"record {self.job_url}/{name}", attempt)

    def read_record(self, name: str) -> bytes | None:
        """The job's small record ``name`` (see :meth:`first_record`), None if absent."""
        path = f"{self._base}/{name}"

        def attempt() -> bytes | None:
            try:
                return bytes(self._fs.cat_file(path))
            except FileNotFoundError:
                return None

        return self._retrying(f"read {self.job_url}/{name}", attempt)

    def _require_conditional_create(self) -> None:
        """S3-compatible stores that ignore ``If-None-Match`` overwrite instead of refusing, and
        two steps would each keep their own record: checked once, with a probe object."""
        if self._conditional_create_checked or self._protocol() not in {"s3", "s3a"}:
            return
        probe = f"{self._base}/.kvx-create-probe-{uuid.uuid4().hex}"
        try:
            self._fs.pipe_file(probe, b"first", mode="create")
        except FileExistsError:
            pass  # our own create, whose answer was lost and re-sent
        try:
            self._fs.pipe_file(probe, b"second", mode="create")
            honoured = False
        except FileExistsError:
            honoured = True
        finally:
            with contextlib.suppress(Exception):
                self._fs.rm_file(probe)
        if not honoured:
            raise ConfigError(
                f"the S3 store of {self._display_root} ignores conditional writes (If-None-Match): "
                "the steps of a run could each record their own save version",
                hint="use a store that supports them (AWS S3; MinIO releases since 2024), or set the pipeline "
                "parameter kvx_save_version",
            )
        self._conditional_create_checked = True

    # --- internals ----------------------------------------------------------------------

    def _create_local(self, path: str, content: bytes) -> None:
        """Create ``path`` whole or not at all: written aside, then hard-linked (which, unlike
        a rename, fails when the name exists)."""
        directory = os.path.dirname(path)
        self._makedirs_local(directory)
        temporary = os.path.join(directory, temp_name(os.path.basename(path)))
        try:
            with open(temporary, "wb") as handle:
                handle.write(content)
            try:
                os.link(temporary, path)
            except FileExistsError:
                pass
        finally:
            try:
                os.unlink(temporary)
            except OSError:
                pass

    def _describe(self, dataset: str) -> str:
        return f"intermediate dataset '{dataset}' at {self.url(dataset)}"

    def _write(self, dataset: str, obj: Any) -> BlobInfo:
        path = self.path(dataset)
        if _is_local(self._fs):
            return self._write_local(dataset, path, obj)
        handle = self._fs.open(path, "wb", block_size=self._upload_block_size())
        sink = _ChecksummedSink(handle)
        try:
            info = write_blob(obj, sink, dataset=dataset, level=self.level, job=self.job_name)
        except BaseException as exc:
            # A stop signal leaves at once: no request to cancel the upload session (which GCS
            # expires by itself) may eat into the grace period before SIGKILL.
            _abandon(handle, self.url(dataset), cancel=isinstance(exc, Exception))
            raise
        try:
            handle.close()
        except Exception as exc:
            # The finalizing request may have succeeded with its answer lost: a re-sent final
            # chunk then gets 404 for the finished session. What is stored decides.
            _abandon(handle, self.url(dataset))
            if failures.is_refused(exc):
                raise  # refused credentials: nothing landed, and no retry changes that
            if isinstance(exc, FileNotFoundError):
                self._check_bucket()  # S3 answers a PUT into a missing bucket with NoSuchBucket
            if self._landed(path, sink):
                log.warning("the answer to the final upload request was lost; the object is complete "
                            "(size and MD5 match what was sent)", dataset=dataset, path=self.url(dataset))
                return info
            raise UploadNotFinalized(f"the upload was not finalized ({_short(exc)})") from exc
        return info

    def _check_bucket(self) -> None:
        """A blob that is missing because its bucket is: a configuration error, said so."""
        if _is_local(self._fs):
            return
        bucket = self._base.split("/", 1)[0]
        try:
            exists = self._fs.exists(bucket)
        except Exception:  # unknown: report the missing blob
            return
        if not exists:
            raise ConfigError(f"bucket {bucket!r} of storage root {self._display_root} does not exist "
                              "(or these credentials cannot see it)",
                              hint="create it, or fix the storage root and the credentials' permissions")

    def _upload_block_size(self) -> int:
        # S3 multipart uploads need parts of at least 5 MiB (s3fs refuses smaller blocks).
        return max(block_size(), _S3_MIN_PART) if self._protocol() in {"s3", "s3a"} else block_size()

    def _landed(self, path: str, sink: _ChecksummedSink) -> bool:
        """Does ``path`` hold exactly the bytes ``sink`` sent?"""
        import base64

        try:
            invalidate = getattr(self._fs, "invalidate_cache", None)
            if invalidate is not None:
                invalidate(path)
            details = self._fs.info(path)
        except Exception:
            return False
        if int(details.get("size") or -1) != sink.count:
            return False
        stored_md5 = details.get("md5Hash")
        if stored_md5:
            return bool(base64.b64decode(stored_md5) == sink.md5.digest())
        etag = str(details.get("ETag") or details.get("etag") or "").strip('"')
        if re.fullmatch(r"[0-9a-f]{32}", etag):  # S3: a single PUT's ETag is its MD5
            return etag == sink.md5.hexdigest()
        try:  # no MD5 (composite objects): the blob's own end marker, as sent
            return bool(self._fs.cat_file(path, start=sink.count - len(sink.tail)) == sink.tail)
        except Exception:
            return False

    def _makedirs_local(self, directory: str) -> None:
        """The job directory, or exit 2 when the root cannot have one (a regular file in the
        way, a read-only or special file system such as /proc)."""
        try:
            os.makedirs(directory, exist_ok=True)
        except OSError as exc:
            if exc.errno in failures.IMPOSSIBLE_PATH_ERRNOS | {errno.ENOENT, errno.EEXIST}:
                raise self._impossible_root(exc) from exc
            raise

    def _write_local(self, dataset: str, path: str, obj: Any) -> BlobInfo:
        directory = os.path.dirname(path)
        self._makedirs_local(directory)
        self._sweep(directory)
        temporary = os.path.join(directory, temp_name(os.path.basename(path)))
        try:
            # No fsync: the rename makes the blob appear whole to readers, and a blob cut short
            # by a crash of the machine fails the reader's trailer check, never silently.
            with open(temporary, "wb", buffering=1024 * 1024) as handle:
                info = write_blob(obj, handle, dataset=dataset, level=self.level, job=self.job_name)
            os.replace(temporary, path)
        except BaseException:
            try:
                os.unlink(temporary)
            except OSError:  # never in place of what stopped the write (a signal, the error)
                pass
            raise
        return info

    def _sweep(self, directory: str) -> None:
        """Once per store: remove what writers that died (SIGKILL, a lost machine) left in
        this job directory. Local roots only: remote writes leave no temporary objects."""
        if self._swept:
            return
        self._swept = True
        try:
            removed = sweep_temp_files(directory)
        except OSError as exc:
            log.warning("could not clean up temporary files", directory=directory, error=str(exc))
            return
        if removed:
            log.info("removed temporary files of writers that died", directory=directory, files=removed)

    def _read(self, dataset: str, producer: str | None) -> tuple[Any, BlobInfo]:
        path = self.path(dataset)
        if _is_local(self._fs) and os.path.isdir(os.path.dirname(path)):
            self._sweep(os.path.dirname(path))
        describe = self._describe(dataset)
        try:
            handle = self._fs.open(path, "rb", block_size=block_size(), cache_type="readahead")
        except FileNotFoundError:
            self._check_bucket()
            made_by = f"it is produced by node '{producer}'" if producer else "no node produces it"
            raise BlobMissing(
                f"{describe} does not exist",
                hint=f"{made_by}; did that step run with the same job name and storage root?",
            ) from None
        with handle:
            size = handle.size if hasattr(handle, "size") else self._fs.size(path)
            try:
                return read_blob(handle, int(size), describe=describe, dataset=dataset, job=self.job_name)
            except BlobMismatch as mismatch:
                # A copy the step cache served from another job's run is that job's blob, by record.
                if mismatch.found_job is None or self.served_from(dataset) != mismatch.found_job:
                    raise
                handle.seek(0)
                return read_blob(handle, int(size), describe=describe, dataset=dataset, job=mismatch.found_job)

    def _served_record(self, dataset: str) -> str:
        return f"served-{object_name(dataset)}.json"

    def note_served(self, dataset: str, source_job: str) -> None:
        """``dataset``'s blob is a copy of job ``source_job``'s (the step cache served it): its
        readers accept that job's header. Overwritten by a later serve of the same step."""
        self._note(self._served_record(dataset), {"job": source_job})

    def served_from(self, dataset: str) -> str | None:
        """The job whose blob the step cache copied as ``dataset``'s, if it did."""
        return self._noted(self._served_record(dataset), "job")

    def note_made(self, dataset: str, key: str) -> None:
        """``dataset`` (intermediate or catalog output) is, in this job, what the step cache key
        ``key`` of its producing node stands for (made or served under it)."""
        self._note(f"made-{object_name(dataset)}.json", {"key": key})

    def made_under(self, dataset: str) -> str | None:
        """The key ``dataset`` was last made or served under in this job, if one was noted."""
        return self._noted(f"made-{object_name(dataset)}.json", "key")

    def note_activity(self, who: str) -> None:
        """Record that ``who`` (a running step, a resume) is at work in this job now, in
        ``activity/<who>.json``: gc deletes a job's blobs only when nothing in its directory is
        newer than its ttl (a job still running needs them all)."""
        import json

        directory = f"{self._base}/{ACTIVITY_DIR}"
        path = f"{directory}/{object_name(who)}.json"
        data = json.dumps({"who": who, "at": time.time()}).encode()

        def attempt() -> None:
            if _is_local(self._fs):
                self._makedirs_local(directory)
            write_file_whole(self._fs, path, data)

        self._retrying(f"record {self.job_url}/{ACTIVITY_DIR}/{object_name(who)}.json", attempt)

    def _note(self, record: str, content: Mapping[str, str]) -> None:
        import json

        path = f"{self._base}/{record}"
        data = json.dumps(dict(content)).encode()

        def attempt() -> None:
            if _is_local(self._fs):
                self._makedirs_local(self._base)
            write_file_whole(self._fs, path, data)

        self._retrying(f"record {self.job_url}/{record}", attempt)

    def _noted(self, record: str, field: str) -> str | None:
        import json

        raw = self.read_record(record)
        try:
            return str(json.loads(raw)[field]) if raw else None
        except (ValueError, KeyError, TypeError):
            return None

    def _retrying(self, what: str, operation: Callable[[], T]) -> T:
        from tenacity import RetryError, Retrying, retry_if_exception, wait_random_exponential

        started = time.monotonic()
        deadline = started + self.retry.budget
        backoff = wait_random_exponential(multiplier=self.retry.initial_wait, max=self.retry.max_wait)

        def wait(state: Any) -> float:  # never sleep past the budget
            return max(0.0, min(float(backoff(state)), deadline - time.monotonic()))

        retrying = Retrying(
            stop=lambda state: state.attempt_number >= self.retry.attempts or time.monotonic() >= deadline,
            wait=wait,
            retry=retry_if_exception(is_transient),
            before_sleep=lambda state: log.warning(
                "storage operation failed, retrying",
                operation=what,
                attempt=state.attempt_number,
                error=_short(state.outcome.exception() if state.outcome else None),
            ),
            reraise=False,
        )
        try:
            with self._request_deadline(deadline):
                return retrying(operation)
        except RetryError as exc:
            last = exc.last_attempt.exception()
            attempts = exc.last_attempt.attempt_number
            elapsed = time.monotonic() - started
            out_of_time = attempts < self.retry.attempts
            raise StorageError(
                f"could not {what} after {attempts} attempt{'s' if attempts != 1 else ''} in {elapsed:.1f} s"
                + (f" (the retry budget, KVX_STORAGE_RETRY_BUDGET={self.retry.budget:g} s, is spent)"
                   if out_of_time else "")
                + f": {_short(last)}"
            ) from last
        except KvxError:
            raise
        except Exception as exc:
            raise self._final_error(what, exc) from exc

    def _request_deadline(self, deadline: float) -> Any:
        """gcsfs's own request retries end by ``deadline`` too (see :mod:`.gcs`)."""
        if self._protocol() in {"gs", "gcs"}:
            from kvx_runtime.storage.gcs import operation_deadline

            return operation_deadline(deadline)
        return contextlib.nullcontext()

    def _protocol(self) -> str:
        return str(self._fs.protocol if isinstance(self._fs.protocol, str) else self._fs.protocol[0])

    def _final_error(self, what: str, exc: Exception) -> KvxError:
        """A failure no retry changes: refused credentials or an impossible root are exit 2,
        anything else exit 3."""
        if failures.is_refused(exc):
            return StorageAccessError(
                f"could not {what}: the storage refused this step's credentials: "
                f"{_short(failures.refused_refresh(exc) or exc)}",
                hint="check the credentials the step runs with (GOOGLE_APPLICATION_CREDENTIALS, the service "
                "account, AWS keys) and their permissions on the storage root",
            )
        if _is_local(self._fs) and isinstance(exc, OSError) and exc.errno in failures.IMPOSSIBLE_PATH_ERRNOS:
            return self._impossible_root(exc)
        return StorageError(f"could not {what}: {_short(exc)}")

    def _impossible_root(self, exc: OSError) -> StorageAccessError:
        return StorageAccessError(
            f"storage root {self._display_root} cannot hold intermediates: "
            f"{exc.strerror or type(exc).__name__}: {exc.filename or self._display_root}",
            hint="use a directory this step may write (or a gs:// or s3:// root)",
        )


def _abandon(handle: Any, where: str, *, cancel: bool = True) -> None:
    """Make sure an unfinished upload is never finalized, and never raise: the error or stop
    signal that interrupted the write is what the caller reports.

    fsspec files flush (and so finalize) what they hold in ``close()`` and when garbage
    collected; marking the handle closed rules both out, whether or not ``discard()`` (which
    cancels GCS's upload session, with ``cancel``) succeeded.
    """
    try:
        discard = getattr(handle, "discard", None) if cancel else None
        if discard is not None:
            discard()
    except Exception as exc:
        log.debug("could not cancel the unfinished upload", path=where, error=type(exc).__name__)
    finally:
        handle.closed = True


def _short(exc: BaseException | None) -> str:
    if exc is None:
        return "unknown error"
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")
