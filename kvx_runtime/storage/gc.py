"""``kvx-runtime gc``: what a storage root no longer needs.

- temporary files of writers that died (SIGKILL, a lost machine) in local roots (remote
  writes leave none: an unfinished GCS upload session expires by itself);
- the step cache's entries that can never hit again (docs/cache.md): an entry expires
  ``run_config.ttl`` seconds after it was recorded, and dangles once a blob it references is
  gone; a step's last-entry record goes with its entry;
- the intermediates of jobs whose newest blob is older than ``run_config.ttl`` (seconds):
  a job that wrote nothing for that long has finished, and its blobs only serve a replay,
  unless an unexpired cache entry references them (deleting them would turn a hit into a miss).
  A running step records its activity in the job directory (storage.activity) and ``resume``
  does before it submits, so a job at work is never taken for finished; a job is listed again
  just before it is deleted, and only the files listed then go (anything newer keeps it).

Dry run by default: it says what it would delete and how much; ``--yes`` deletes, and only
what is older than :data:`MIN_DELETE_AGE` (a job between two steps writes nothing for minutes).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from kvx_runtime.errors import KvxError, StorageError, UsageError
from kvx_runtime.settings import HEARTBEAT_INTERVAL
from kvx_runtime.storage.store import TEMP_DIR, _filesystem, _is_local, _short, sweep_temp_files

if TYPE_CHECKING:
    from kvx_runtime.cache.store import IndexFile

__all__ = ["MIN_DELETE_AGE", "GarbageReport", "collect_garbage", "describe"]

#: The shortest age (seconds) gc deletes at: twice the longest heartbeat interval a running step
#: may have, and longer than a pipeline waits between two steps for a machine.
MIN_DELETE_AGE = 2 * (HEARTBEAT_INTERVAL.maximum or 1800.0)


@dataclass
class GarbageReport:
    root: str
    temp_files: list[str] = field(default_factory=list)
    expired_jobs: list[tuple[str, int, float]] = field(default_factory=list)  # (job dir, bytes, age s)
    #: Jobs past the ttl that an unexpired cache entry uses: (job dir, age s, entries).
    kept_jobs: list[tuple[str, float, int]] = field(default_factory=list)
    #: Jobs past the ttl when listed, written to before they were deleted: (job dir, newest age s).
    revived_jobs: list[tuple[str, float]] = field(default_factory=list)
    #: Cache entries that can never hit again: (key, step, bytes, why).
    cache_entries: list[tuple[str, str, int, str]] = field(default_factory=list)
    #: Steps' last-entry records whose entry is gone: (file name, bytes).
    step_records: list[tuple[str, int]] = field(default_factory=list)
    #: The job whose files were being deleted when gc stopped (some may be gone): its name.
    partly_deleted: str | None = None
    deleted: bool = False

    @property
    def bytes(self) -> int:
        return (sum(size for _, size, _ in self.expired_jobs) + sum(size for _, _, size, _ in self.cache_entries)
                + sum(size for _, size in self.step_records))


def _modified(info: dict[str, Any]) -> float:
    """Modification time (epoch seconds) of an fsspec listing entry, local or GCS."""
    if isinstance(info.get("mtime"), (int, float)):
        return float(info["mtime"])
    for key in ("updated", "mtime", "timeCreated", "LastModified"):
        value = info.get(key)
        if isinstance(value, datetime):
            return value.timestamp()
        if isinstance(value, str):
            try:
                return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
            except ValueError:
                continue
    return time.time()  # unknown: treated as fresh, never deleted


def collect_garbage(root: str, max_age: float, *, delete: bool = False,
                    report: GarbageReport | None = None) -> GarbageReport:
    """List (and with ``delete``, remove) what ``root`` no longer needs, into ``report`` (a new
    one by default: pass one to keep what was done when it fails half-way). A storage failure
    is a :class:`StorageError` (exit 3) naming the root; what was deleted before it stays
    deleted (and in ``report``). Deleting below :data:`MIN_DELETE_AGE` is a :class:`UsageError`."""
    if math.isnan(max_age) or max_age < 0:  # nan compares false with every age: all would expire
        raise UsageError(f"gc's age must be a number of seconds (0 or more), not {max_age:g}",
                         hint="pass --older-than SECONDS (or set run_config.ttl)")
    if delete and max_age < MIN_DELETE_AGE:
        raise UsageError(f"gc deletes only what is at least {MIN_DELETE_AGE / 3600:g} hours old, not "
                         f"{max_age:g} seconds: a running pipeline writes nothing for minutes between two steps",
                         hint=f"pass --older-than {MIN_DELETE_AGE:g} or more (or set run_config.ttl so); "
                         "a dry run lists at any age")
    report = report if report is not None else GarbageReport(root=root)
    try:
        return _collect(root, max_age, delete, report)
    except KvxError:
        raise
    except Exception as exc:
        raise StorageError(f"could not clean {root}: {_short(exc)}") from exc


def _collect(root: str, max_age: float, delete: bool, report: GarbageReport) -> GarbageReport:
    from kvx_runtime.cache.store import StepCache

    fs, base = _filesystem(root)
    fs.invalidate_cache()  # a listing cached by this process (gcsfs) could hide what others wrote
    temp_root = f"{base}/{TEMP_DIR}"
    report.deleted = delete
    now = time.time()
    cache = StepCache(root)
    # Read in the reverse of the order a run writes (blobs, its entry, its step's record): what
    # is listed later is at least as new, so an entry written during this gc never looks
    # dangling and a step's record never looks orphaned.
    steps = cache.index("steps")
    entries = cache.index("entries")
    if _is_local(fs):  # a local entry write killed half-way leaves its temporary file
        for directory in cache.index_directories():
            if os.path.isdir(directory):
                folder = directory[len(base) + 1:]
                report.temp_files += [f"{folder}/{name}" for name in sweep_temp_files(directory, dry_run=not delete)]
    jobs = _jobs(fs, temp_root, report, delete)
    files = {path for _, listed, _ in jobs for path in listed}

    keeping: dict[str, int] = {}  # job dir -> unexpired entries that use its blobs
    going: list[tuple[IndexFile, str]] = []
    for file in entries:
        why, used = _entry_fate(file, fs, temp_root, files, now, max_age)
        if why is None:
            for job in used:
                keeping[job] = keeping.get(job, 0) + 1
        else:
            going.append((file, why))
    gone = set()
    for file, why in going:
        if delete and not cache.remove(file):
            continue  # recorded again since it was read: fresh, it stays
        gone.add(file.name)
        report.cache_entries.append((file.name.removesuffix(".json"), _step_of(file), file.size, why))
    present = {file.name for file in entries} - gone
    for file in steps:
        if file.entry is not None and f"{file.entry.key}.json" in present:
            continue
        if file.entry is None and now - _modified(dict(file.info)) <= max_age:
            continue  # unreadable (another format): only its age tells
        if delete and not cache.remove(file):
            continue
        report.step_records.append((file.name, file.size))

    # Entries go before the blobs they reference: a lookup from now on misses.
    for job_name, listed, job in jobs:
        newest = max(_modified(info) for info in listed.values())
        if now - newest <= max_age:
            continue
        if job_name in keeping:
            report.kept_jobs.append((job_name, now - newest, keeping[job_name]))
            continue
        if delete:
            # Listed again: a job written to since the pass began (a resume, a step) stays, and
            # only what this listing holds goes (a file written after it is never deleted).
            fs.invalidate_cache(job)
            listed = fs.find(job, detail=True)
            if not listed:
                continue
            newest = max(_modified(info) for info in listed.values())
            if time.time() - newest <= max_age:
                report.revived_jobs.append((job_name, time.time() - newest))
                continue
            report.partly_deleted = job_name  # until all its files are gone: a stop now leaves part
            _delete_listed(fs, job, listed)
            report.partly_deleted = None
        report.expired_jobs.append((job_name, sum(int(info.get("size") or 0) for info in listed.values()),
                                    now - newest))
    return report


def _delete_listed(fs: Any, job: str, listed: dict[str, dict[str, Any]]) -> None:
    """Deletes the files of ``job`` just ``listed`` (path -> listing entry), checks that they
    are gone (an S3 bulk delete reports a key it could not delete only in its answer; a file
    written again since, newer than its listing, is not one) and, on a local disk, removes the
    directories left empty."""
    paths = sorted(listed)
    try:
        fs.rm(paths)
    except FileNotFoundError:
        # Some deleted meanwhile (another gc, a lifecycle rule). fsspec's local rm stops at the
        # first of them: the others are deleted one by one, what is gone already skipped.
        for path in paths:
            try:
                fs.rm_file(path)
            except FileNotFoundError:
                continue
    fs.invalidate_cache(job)
    left = sorted(path for path, info in fs.find(job, detail=True).items()
                  if path in listed and _modified(info) <= _modified(listed[path]))
    if left:
        raise StorageError(f"could not delete {len(left)} of the {len(paths)} files of job "
                           f"{job.rstrip('/').rsplit('/', 1)[-1]} (e.g. {left[0]})")
    if _is_local(fs):
        for directory, _, _ in sorted(os.walk(job), key=lambda entry: -len(entry[0])):
            try:
                os.rmdir(directory)
            except OSError:  # not empty: written to since (it stays), or already gone
                continue


def _jobs(fs: Any, temp_root: str, report: GarbageReport,
          delete: bool) -> list[tuple[str, dict[str, dict[str, Any]], str]]:
    """Each job directory with files: (name, its files' listings by path, its path); dead
    writers' temporary files swept (with ``delete``) and reported on the way."""
    try:  # only "not found" means no job: any other failure is no listing (never "all gone")
        entries = fs.ls(temp_root, detail=True)
    except FileNotFoundError:
        return []
    found = []
    for job in sorted(entry["name"] for entry in entries if entry.get("type") == "directory"):
        job_name = job.rstrip("/").rsplit("/", 1)[-1]
        if _is_local(fs):
            report.temp_files += [f"{job_name}/{name}" for name in sweep_temp_files(job, dry_run=not delete)]
        listed = fs.find(job, detail=True)
        if listed:
            found.append((job_name, listed, job))
    return found


def _entry_fate(file: IndexFile, fs: Any, temp_root: str, files: set[str], now: float,
                max_age: float) -> tuple[str | None, set[str]]:
    """Why a cache entry can never hit again (None: it can), and the job directories whose
    blobs it uses. It expires ``max_age`` after it was recorded; it dangles when a blob it
    references is gone."""
    entry = file.entry
    created = entry.created_at if entry is not None else None
    age = now - (created if created is not None else _modified(dict(file.info)))
    if age > max_age:
        return f"expired: recorded {age / 86400:.1f} days ago", set()
    if entry is None:
        return None, set()  # unreadable but recent (another version's format): its age decides
    used = set()
    for name, output in entry.outputs.items():
        path = _under(output.get("location", ""), fs, temp_root)
        if path is None:
            continue  # a catalog file: not the gc's to judge (a hit checks its fingerprint)
        job = path[len(temp_root) + 1:].split("/", 1)[0]
        if path not in files and _gone(fs, path):
            return f"dangling: the blob {name} of job {job} is gone", set()
        used.add(job)
    return None, used


def _gone(fs: Any, path: str) -> bool:
    """Whether the blob at ``path``, absent from the listing, is gone: asked once more (of the
    store, not of the listings gc has just cached: s3fs and gcsfs answer "not found" from a
    cached listing of its directory), and only "not found" says so (a failure to answer
    raises: an entry is never deleted for it)."""
    fs.invalidate_cache(path)
    try:
        fs.info(path)
    except FileNotFoundError:
        return True
    return False


def _under(location: str, fs: Any, temp_root: str) -> str | None:
    """``location`` as ``fs`` names it, when it is in a job directory of this root; else None."""
    from fsspec.utils import get_protocol

    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    if not location or get_protocol(location) not in protocols:
        return None
    path = fs._strip_protocol(location).rstrip("/")
    return path if path.startswith(f"{temp_root}/") else None


def _step_of(file: IndexFile) -> str:
    return file.entry.step if file.entry is not None else "?"


def describe(report: GarbageReport) -> list[str]:
    verb = "deleted" if report.deleted else "would delete"
    lines = [f"{verb} temporary file of a dead writer: {name}" for name in report.temp_files]
    lines += [f"{verb} cache entry {key[:16]} (step {step}): {why}" for key, step, _, why in report.cache_entries]
    lines += [f"{verb} step record {name}: no entry left for it" for name, _ in report.step_records]
    lines += [f"{verb} job {name}: {size / 1e6:.1f} MB, newest blob {age / 86400:.1f} days old"
              for name, size, age in report.expired_jobs]
    lines += [f"kept job {name}: newest blob {age / 86400:.1f} days old, but {count} unexpired cache "
              f"entr{'y uses' if count == 1 else 'ies use'} it" for name, age, count in report.kept_jobs]
    lines += [f"kept job {name}: written to during this gc ({age / 60:.0f} minutes ago)"
              for name, age in report.revived_jobs]
    if report.partly_deleted is not None:
        lines.append(f"stopped while deleting job {report.partly_deleted}: some of its files may be gone "
                     "(gc --yes again finishes it)")
    cache_bytes = sum(size for _, _, size, _ in report.cache_entries) + sum(size for _, size in report.step_records)
    summary = (f"{report.root}: {len(report.expired_jobs)} expired job(s), {len(report.cache_entries)} cache "
               f"entr{'y' if len(report.cache_entries) == 1 else 'ies'} ({cache_bytes / 1e3:.1f} kB), "
               f"{report.bytes / 1e6:.1f} MB in all; {len(report.temp_files)} temporary file(s)")
    if not report.deleted and (report.expired_jobs or report.temp_files or report.cache_entries
                               or report.step_records):
        summary += " (dry run: pass --yes to delete)"
    return [*lines, summary]
