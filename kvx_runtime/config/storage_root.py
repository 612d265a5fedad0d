"""Where a command's storage root comes from, and what a storage root may look like: one rule
for every command (``--storage-root``, else ``run_config.root``, else a command's default).

Also what the ``${storage_root}`` config placeholder means (a cloud env's catalog puts local
datasets under it, :mod:`kvx_runtime.cloud_env`): in a step, the step's storage root, which
``exec-node`` exports as ``KEDRO_CONFIG_STORAGE_ROOT``; while ``compile`` loads the catalog, the
compile's storage root (exported the same way); anywhere else (``kedro run --env cloud``)
``KEDRO_CONFIG_STORAGE_ROOT`` when set, else the env's ``run_config.root``, else it is undefined
and loading the catalog fails naming the variable. Never a silent local fallback: a step that
would write the catalog's datasets to its own disk loses them when its machine goes.
"""

from __future__ import annotations

import os
import re

from kvx_runtime.errors import ConfigError

__all__ = [
    "LOCAL_STATE_DIR",
    "STORAGE_ROOT_FORMS",
    "configured_storage_root",
    "is_on_this_machine",
    "local_storage_root",
    "normalize_storage_root",
    "resolve_storage_root",
    "under_storage_root",
]

#: What a storage root may look like (said in every error about one).
STORAGE_ROOT_FORMS = "gs://bucket[/prefix], s3://bucket[/prefix], file:///absolute/path, or a local path"
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]$")
#: S3 (and MinIO) bucket names: 3-63 lowercase letters, digits, dots and hyphens.
_S3_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
#: Scheme -> (canonical scheme, bucket name rule, what such a bucket is called).
_BUCKET_RULES = {
    "gs": ("gs", _BUCKET, "a Cloud Storage"),
    "gcs": ("gs", _BUCKET, "a Cloud Storage"),
    "s3": ("s3", _S3_BUCKET, "an S3"),
    "s3a": ("s3", _S3_BUCKET, "an S3"),
}


#: Where a project's local runs keep their state (compiled spec, step logs, storage root).
LOCAL_STATE_DIR = ".kvx"


def local_storage_root(project: str | os.PathLike[str]) -> str:
    """The storage root of runs on this machine: ``<project>/.kvx/storage``."""
    return os.path.join(os.fspath(project), LOCAL_STATE_DIR, "storage")


def resolve_storage_root(flag: str | None, configured: str | None, *, required: bool,
                         default: str | None = None) -> str | None:
    """The storage root of a command, by one rule for every command.

    ``--storage-root`` when given (even empty: an error, never silently another root; a path
    without a scheme is local), else ``run_config.root`` (a bare ``bucket/prefix`` is
    ``gs://``), else ``default``. None of them: a ConfigError (exit 2) when ``required``.
    """
    if flag is not None:
        return normalize_storage_root(flag, bare_is_bucket=False)
    if configured:
        return normalize_storage_root(configured)
    if default is not None:
        return normalize_storage_root(default, bare_is_bucket=False)
    if required:
        raise ConfigError("no storage root is set",
                          hint=f"pass --storage-root or set run_config.root ({STORAGE_ROOT_FORMS})")
    return None


def configured_storage_root(conf_source: str | os.PathLike[str], env: str, base_env: str = "base",
                            merge_strategy: str = "destructive") -> str | None:
    """``${storage_root}`` where neither a step nor a command exported one: the env's
    ``run_config.root``, normalized as every command reads it; None when it sets none."""
    from kvx_runtime.config.files import read_raw_plugin_config

    raw, _ = read_raw_plugin_config(os.fspath(conf_source), env, base_env=base_env, merge_strategy=merge_strategy)
    run_config = raw.get("run_config")
    root = run_config.get("root") if isinstance(run_config, dict) else None
    return normalize_storage_root(root) if isinstance(root, str) and root.strip() else None


def is_on_this_machine(root: str) -> bool:
    """Is the (resolved) storage root ``root`` a local path (``file://`` or none), not a bucket?"""
    return "://" not in root.removeprefix("file://")


def under_storage_root(path: str, root: str) -> bool:
    """Is ``path`` (a catalog dataset's, as loaded) under the run's storage root ``root`` (as
    resolved)? Every step of the run sees what is there, whatever the target."""
    prefix = root.rstrip("/")
    return path == prefix or path.startswith(prefix + "/")


def normalize_storage_root(root: str, *, bare_is_bucket: bool = True) -> str:
    """The storage root as a URL or an absolute local path; anything else is a ConfigError.

    In ``run_config.root`` a bare ``bucket/prefix`` (the seed's style) means
    ``gs://bucket/prefix``; on the command line (``bare_is_bucket=False``) a path without a
    scheme is a local path. Accepted schemes: ``gs://`` (``gcs://``) and ``s3://`` (``s3a://``)
    with a valid bucket name and ``file://`` with an absolute path. In-process file systems
    (``memory://``) are refused: what a step writes there dies with its process.
    """
    text = root.strip()
    if not text:
        raise _refused("the storage root is empty")
    if "://" not in text:
        if text.startswith(("/", "./", "../", "~")) or not bare_is_bucket:
            return os.path.abspath(os.path.expanduser(text))
        text = "gs://" + text.strip("/")
    scheme, _, rest = text.partition("://")
    scheme = scheme.lower()
    shown = root if len(root) <= 80 else root[:77] + "..."
    bucket_rule = _BUCKET_RULES.get(scheme)
    if bucket_rule is not None:
        canonical, pattern, kind = bucket_rule
        bucket = rest.split("/", 1)[0]
        if not pattern.match(bucket) or ".." in bucket:
            raise _refused(f"storage root {shown!r}: {bucket!r} is not {kind} bucket name" if bucket
                           else f"storage root {shown!r} names no bucket")
        return f"{canonical}://{rest}".rstrip("/")
    if scheme == "file":
        if not rest.startswith("/") or not rest.strip("/"):
            raise _refused(f"storage root {shown!r}: a file:// root needs an absolute path (file:///dir)")
        return f"file://{rest}".rstrip("/")
    if scheme == "memory":
        raise _refused(f"storage root {shown!r}: memory:// lives inside one process, and every step is "
                       "a process of its own: what one step writes, the next would never see")
    raise _refused(f"storage root {shown!r}: unsupported scheme {scheme + '://' if scheme else '(none)'}")


def _refused(message: str) -> ConfigError:
    """Every refused storage root says which forms are accepted."""
    return ConfigError(message, hint=f"use {STORAGE_ROOT_FORMS}")
