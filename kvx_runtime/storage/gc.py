"""``kvx-runtime gc``: what a storage root no longer needs.

- temporary files of writers that died (SIGKILL, a lost machine) in local roots (remote
  writes leave none: an unfinished GCS upload session expires by itself);
- the intermediates of jobs whose newest blob is older than ``run_config.ttl`` (seconds):
  a job that wrote nothing for that long has finished, and its blobs only serve a replay.

Dry run by default: it says what it would delete and how much; ``--yes`` deletes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from kvx_runtime.errors import KvxError, StorageError
from kvx_runtime.storage.store import TEMP_DIR, _filesystem, _is_local, _short, sweep_temp_files

__all__ = ["GarbageReport", "collect_garbage", "describe"]


@dataclass
class GarbageReport:
    root: str
    temp_files: list[str] = field(default_factory=list)
    expired_jobs: list[tuple[str, int, float]] = field(default_factory=list)  # (job dir, bytes, age s)
    deleted: bool = False

    @property
    def bytes(self) -> int:
        return sum(size for _, size, _ in self.expired_jobs)


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


def collect_garbage(root: str, max_age: float, *, delete: bool = False) -> GarbageReport:
    """List (and with ``delete``, remove) what ``root`` no longer needs. A storage failure is a
    :class:`StorageError` (exit 3) naming the root; what was deleted before it stays deleted."""
    try:
        return _collect(root, max_age, delete)
    except KvxError:
        raise
    except Exception as exc:
        raise StorageError(f"could not clean {root}: {_short(exc)}") from exc


def _collect(root: str, max_age: float, delete: bool) -> GarbageReport:
    fs, base = _filesystem(root)
    temp_root = f"{base}/{TEMP_DIR}"
    report = GarbageReport(root=root)
    if not fs.exists(temp_root):
        return report
    now = time.time()
    for job in sorted(fs.ls(temp_root, detail=False)):
        if not fs.isdir(job):
            continue
        job_name = job.rstrip("/").rsplit("/", 1)[-1]
        if _is_local(fs):
            report.temp_files += [f"{job_name}/{name}" for name in sweep_temp_files(job, dry_run=not delete)]
        files = fs.find(job, detail=True)
        if not files:
            continue
        newest = max(_modified(info) for info in files.values())
        if now - newest > max_age:
            size = sum(int(info.get("size") or 0) for info in files.values())
            report.expired_jobs.append((job_name, size, now - newest))
            if delete:
                fs.rm(job, recursive=True)
    report.deleted = delete
    return report


def describe(report: GarbageReport) -> list[str]:
    verb = "deleted" if report.deleted else "would delete"
    lines = [f"{verb} temporary file of a dead writer: {name}" for name in report.temp_files]
    lines += [f"{verb} job {name}: {size / 1e6:.1f} MB, newest blob {age / 86400:.1f} days old"
              for name, size, age in report.expired_jobs]
    summary = (f"{report.root}: {len(report.expired_jobs)} expired job(s), {report.bytes / 1e6:.1f} MB; "
               f"{len(report.temp_files)} temporary file(s)")
    if not report.deleted and (report.expired_jobs or report.temp_files):
        summary += " (dry run: pass --yes to delete)"
    return [*lines, summary]
