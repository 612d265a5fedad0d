"""The step cache's index under the storage root: ``<root>/kvx-cache/entries/<key>.json``.

An entry is written when a step succeeds with the cache on: the step's key (with its parts),
which run wrote it, and for each output its location and a fingerprint of what is there
(:func:`~kvx_runtime.cache.key.fingerprint_path`: a local file's bytes, a remote object's
checksum). Outputs are referenced where the run wrote them, never copied into the cache: a hit
copies them to this run's locations (server-side on GCS and S3), and does nothing for an
output whose location is the same (a catalog path without the run id).

Never a stale hit: before serving, every output's fingerprint is checked against the entry;
an output changed or gone since (overwritten by another run, removed by ``gc``) makes a miss.
Entries are written whole (a temporary file renamed, or a single upload), so two runs filling
the same key leave one complete entry (the last one), each pointing at outputs that exist.
``<root>/kvx-cache/steps/<step>.json`` keeps the last key recorded for a step name, for
``plan`` to say what changed. ``gc`` lists the index (:meth:`StepCache.index`) and removes what
can never hit again (:meth:`StepCache.remove`, only a file unchanged since it was read).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

from kvx_runtime.cache.key import StepKey, fingerprint_path
from kvx_runtime.errors import StorageError
from kvx_runtime.log import get_logger
from kvx_runtime.storage.store import _filesystem, _is_local, _short, object_name, temp_name, write_file_whole

__all__ = ["CACHE_DIR", "CacheEntry", "IndexFile", "StepCache"]

log = get_logger(__name__)

CACHE_DIR = "kvx-cache"
FORMAT = 1


@dataclass(frozen=True)
class CacheEntry:
    key: str
    step: str
    nodes: tuple[str, ...]
    run_id: str
    job_name: str
    created: str
    parts: Mapping[str, str]
    #: Output dataset -> {"location": where it is, "fingerprint": what was there}.
    outputs: Mapping[str, Mapping[str, str]] = field(default_factory=dict)

    @classmethod
    def from_json(cls, raw: bytes) -> CacheEntry:
        data = json.loads(raw)
        if not isinstance(data, dict):
            raise ValueError(f"a cache entry is a JSON object, not {type(data).__name__}")
        if data.get("format") != FORMAT:
            raise ValueError(f"cache entry format {data.get('format')!r}")
        outputs = data["outputs"]
        if not isinstance(outputs, dict) or not all(
                isinstance(output, dict) and isinstance(output.get("location"), str)
                and isinstance(output.get("fingerprint"), str) for output in outputs.values()):
            raise ValueError("a cache entry's outputs map each dataset to its location and fingerprint")
        if not isinstance(data["parts"], dict) or not isinstance(data["nodes"], list):
            raise ValueError("a cache entry's parts are a JSON object and its nodes a list")
        return cls(key=str(data["key"]), step=str(data["step"]), nodes=tuple(map(str, data["nodes"])),
                   run_id=str(data["run_id"]), job_name=str(data["job_name"]), created=str(data["created"]),
                   parts=dict(data["parts"]), outputs={str(name): dict(output) for name, output in outputs.items()})

    def to_json(self) -> bytes:
        return json.dumps({"format": FORMAT, **asdict(self)}, sort_keys=True, indent=1).encode()

    @property
    def created_at(self) -> float | None:
        """When the entry was recorded (epoch seconds); None when ``created`` cannot be read."""
        try:
            created = datetime.fromisoformat(self.created)
        except (TypeError, ValueError):
            return None
        return (created if created.tzinfo else created.replace(tzinfo=timezone.utc)).timestamp()


#: The index's two folders: entries by key, and each step's last entry.
INDEX_KINDS = ("entries", "steps")


@dataclass(frozen=True)
class IndexFile:
    """One file of the cache's index as ``gc`` read it: an entry, or a step's last entry."""

    kind: str
    #: The file's path, as the store's file system names it.
    path: str
    size: int
    #: The store's listing of the file (its modification time, for an unreadable file's age).
    info: Mapping[str, Any]
    raw: bytes
    #: None: unreadable (damaged, or another format).
    entry: CacheEntry | None

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]


class StepCache:
    """The cache index of one storage root."""

    def __init__(self, root: str) -> None:
        self.root = root.rstrip("/")
        self._fs, base = _filesystem(root)
        self._base = f"{base}/{CACHE_DIR}"

    def _entry_path(self, digest: str) -> str:
        return f"{self._base}/entries/{digest}.json"

    def _step_path(self, step: str) -> str:
        return f"{self._base}/steps/{object_name(step)}.json"

    def url(self, digest: str) -> str:
        return f"{self.root}/{CACHE_DIR}/entries/{digest}.json"

    # --- reading --------------------------------------------------------------------------

    def _read(self, path: str) -> CacheEntry | None:
        try:
            raw = self._fs.cat_file(path)
        except FileNotFoundError:
            return None
        except Exception as exc:  # the store's own errors (gcsfs, s3fs, aiohttp) as one line
            raise StorageError(f"cannot read the step cache at {self.root}/{CACHE_DIR}: {_short(exc)}") from None
        return _parse(raw, path)

    def lookup(self, key: StepKey) -> tuple[CacheEntry | None, str]:
        """The entry of ``key`` if every output it names is still what it was; else None and
        why (for the log and ``plan``)."""
        if not key.cacheable:
            return None, "not cacheable: " + "; ".join(key.uncacheable)
        entry = self._read(self._entry_path(key.digest))
        if entry is None:
            return None, "no entry for this key"
        for name, output in entry.outputs.items():
            digest, why = fingerprint_path(output["location"], key.reach.get(name))
            if why is not None and not why.endswith("does not exist"):  # a store that could not be asked
                return None, f"output {name} of run {entry.run_id} cannot be checked ({output['location']}: {why})"
            if digest != output["fingerprint"]:
                return None, f"output {name} of run {entry.run_id} changed or is gone ({output['location']})"
        return entry, f"entry of run {entry.run_id}"

    def last_key(self, step: str) -> CacheEntry | None:
        """The last entry recorded for the step ``step`` (whatever its key)."""
        return self._read(self._step_path(step))

    # --- the index, for gc -----------------------------------------------------------------

    def index_directories(self) -> list[str]:
        """The index's folders, as the store's file system names them (whether they exist or not)."""
        return [f"{self._base}/{kind}" for kind in INDEX_KINDS]

    def index(self, kind: str) -> list[IndexFile]:
        """Every file of ``entries`` or ``steps``, read; a write's temporary file is not one
        (entries are written whole: an unfinished write is never listed under its name)."""
        if kind not in INDEX_KINDS:
            raise ValueError(f"no cache index {kind!r}")
        directory = f"{self._base}/{kind}"
        try:
            listed = self._fs.ls(directory, detail=True)
        except FileNotFoundError:
            return []
        found = []
        for info in listed:
            path = info["name"].rstrip("/")
            name = path.rsplit("/", 1)[-1]
            if info.get("type") != "file" or name.startswith(".") or not name.endswith(".json"):
                continue
            try:
                raw = self._fs.cat_file(path)
            except FileNotFoundError:  # removed since listed
                continue
            found.append(IndexFile(kind=kind, path=path, size=len(raw), info=info, raw=raw,
                                   entry=_parse(raw, path)))
        return found

    def remove(self, file: IndexFile) -> bool:
        """Delete ``file`` if it is still what was read; False when it is gone or was rewritten
        since (a run recorded the key again: that entry is fresh and stays)."""
        try:
            if self._fs.cat_file(file.path) != file.raw:
                return False
            self._fs.rm_file(file.path)
        except FileNotFoundError:
            return False
        return True

    # --- writing --------------------------------------------------------------------------

    def record(self, key: StepKey, *, nodes: tuple[str, ...], run_id: str, job_name: str,
               outputs: Mapping[str, str],
               as_saved: Mapping[str, tuple[str, str | None]] | None = None) -> CacheEntry | None:
        """Write the entry of a step that succeeded (outputs: dataset -> location); None, with
        a warning, when an output cannot be fingerprinted (the step then never hits).
        ``as_saved``: outputs fingerprinted as the step saved them (dataset -> what
        :func:`fingerprint_path` said then): the entry records what this step wrote, so that
        another run writing the same place since is a miss at lookup, never its data served
        under this key."""
        fingerprints: dict[str, dict[str, str]] = {}
        for name, location in outputs.items():
            digest, why = (as_saved or {}).get(name) or fingerprint_path(location, key.reach.get(name))
            if why is not None:
                log.warning("step not cached: an output cannot be fingerprinted", dataset=name, reason=why)
                return None
            fingerprints[name] = {"location": location, "fingerprint": digest}
        entry = CacheEntry(key=key.digest, step=key.step, nodes=nodes, run_id=run_id, job_name=job_name,
                           created=datetime.now(timezone.utc).isoformat(), parts=dict(key.parts),
                           outputs=fingerprints)
        data = entry.to_json()
        self._write_whole(self._entry_path(key.digest), data)
        self._write_whole(self._step_path(key.step), data)
        return entry

    def _write_whole(self, path: str, data: bytes) -> None:
        """``data`` at ``path`` whole or not at all: a renamed temporary file on a local disk,
        one upload (a single object creation) on GCS and S3."""
        if _is_local(self._fs):
            os.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        write_file_whole(self._fs, path, data)

    # --- serving --------------------------------------------------------------------------

    def serve(self, entry: CacheEntry, destinations: Mapping[str, str],
              reach: Mapping[str, Mapping[str, Any]] | None = None) -> list[str]:
        """Make each output of ``entry`` available at this run's location (``destinations``:
        dataset -> location; ``reach``: dataset -> the file system options its places are
        reached with, :attr:`StepKey.reach`); returns the datasets copied (an output already
        where this run wants it is left as is)."""
        copied = []
        for name, destination in destinations.items():
            source = entry.outputs[name]["location"]
            if _same_place(source, destination, (reach or {}).get(name)):
                continue
            _copy(source, destination, entry.outputs[name]["fingerprint"], (reach or {}).get(name))
            copied.append(name)
        return copied


def _parse(raw: bytes, path: str) -> CacheEntry | None:
    try:
        return CacheEntry.from_json(raw)
    except (ValueError, KeyError, TypeError) as exc:
        log.warning("unreadable cache entry ignored", entry=path, error=str(exc)[:200])
        return None


def _same_place(one: str, other: str, options: Mapping[str, Any] | None) -> bool:
    """The same file or object, however spelled (``gs://`` and ``gcs://``, ``s3a://`` and
    ``s3://``, ``file://``): a copy onto itself would replace (and, once checked, remove) it."""
    if one == other:
        return True
    import fsspec

    try:
        one_fs, one_path = fsspec.core.url_to_fs(one, **(options or {}))
        other_fs, other_path = fsspec.core.url_to_fs(other, **(options or {}))
    except Exception:  # not comparable here: the copy says what is wrong
        return False
    return type(one_fs) is type(other_fs) and one_path.rstrip("/") == other_path.rstrip("/")


def _copy(source: str, destination: str, fingerprint: str, options: Mapping[str, Any] | None = None) -> None:
    """Copy a file or folder, whole or not at all under the destination name: server-side on
    the same object store, then the source checked to be still what the entry recorded (its
    generation and checksums unchanged since the lookup, so the copy is of that content); through
    a temporary name renamed on a local disk, once the copy is checked to be what the entry
    recorded. Another run may have rewritten the source since the lookup: a ValueError then (a
    remote copy removed first), which the step takes as a miss."""
    import fsspec

    options = options or {}
    source_fs, source_path = fsspec.core.url_to_fs(source, **options)
    target_fs, target_path = fsspec.core.url_to_fs(destination, **options)
    if type(source_fs) is not type(target_fs):
        raise ValueError(f"cannot copy {source} to {destination}: another file system")
    recursive = source_fs.isdir(source_path)
    if not _is_local(target_fs):
        if recursive and target_fs.exists(target_path):
            # A folder copied onto an existing one lands inside it (cp -r), beside the old files.
            target_fs.rm(target_path, recursive=True)
        source_fs.copy(source_path, target_path, recursive=recursive)
        if fingerprint_path(source, options)[0] != fingerprint:
            target_fs.rm(target_path, recursive=recursive)
            raise ValueError(f"{source} changed while it was served: not this key's output any more")
        return
    parent = os.path.dirname(target_path)
    os.makedirs(parent, exist_ok=True)
    temporary = os.path.join(parent, temp_name(os.path.basename(target_path)))
    try:
        source_fs.copy(source_path, temporary, recursive=recursive)
        if fingerprint_path(temporary)[0] != fingerprint:
            raise ValueError(f"{source} changed while it was served: not this key's output any more")
        if recursive and os.path.isdir(target_path):
            import shutil

            shutil.rmtree(target_path)
        os.replace(temporary, target_path)
    finally:
        if os.path.exists(temporary):
            import shutil

            shutil.rmtree(temporary) if os.path.isdir(temporary) else os.unlink(temporary)


#: kedro-datasets types whose ``filepath`` is one file or folder kept exactly as Kedro's file
#: datasets keep it (``get_protocol_and_path``, then a ``PurePosixPath``): their location can be
#: told from the configuration without building the dataset, which would import the type's
#: package (``kedro_datasets.pandas`` imports every pandas dataset, SQLAlchemy included: 0.2 s).
#: tests/test_cache_store.py checks each against the dataset built.
PLAIN_FILE_TYPES = frozenset({
    "pandas.CSVDataset", "pandas.ExcelDataset", "pandas.FeatherDataset", "pandas.GenericDataset",
    "pandas.HDFDataset", "pandas.JSONDataset", "pandas.ParquetDataset", "pandas.XMLDataset",
    "json.JSONDataset", "pickle.PickleDataset", "text.TextDataset", "yaml.YAMLDataset",
})


def dataset_location(dataset: Any) -> str | None:
    """Where a Kedro dataset object saves (its versioned path for this run's save version), as
    fsspec opens it; None when it has no single file or folder kvx-runtime can tell."""
    filepath = getattr(dataset, "_filepath", None)
    protocol = getattr(dataset, "_protocol", None)
    if filepath is None:
        return None
    version = getattr(dataset, "_version", None)
    if version is not None:
        save = getattr(version, "save", None)
        if not save or not hasattr(dataset, "_get_versioned_path"):
            return None
        filepath = dataset._get_versioned_path(save)
    return _location(protocol, filepath)


def configured_location(config: Mapping[str, Any] | None) -> str | None:
    """:func:`dataset_location` of the dataset ``config`` (a catalog's resolved entry) describes,
    told without building it; None when the configuration alone cannot tell (a type outside
    :data:`PLAIN_FILE_TYPES`, a versioned dataset): build the dataset and ask it."""
    if not isinstance(config, Mapping) or config.get("versioned"):
        return None
    kind, filepath = config.get("type"), config.get("filepath")
    if not isinstance(kind, str) or not isinstance(filepath, str) \
            or kind.removeprefix("kedro_datasets.") not in PLAIN_FILE_TYPES:
        return None
    from pathlib import PurePosixPath

    from kedro.io.core import get_protocol_and_path

    protocol, path = get_protocol_and_path(filepath)
    return _location(protocol, PurePosixPath(path))


def _location(protocol: str | None, filepath: Any) -> str:
    from kedro.io.core import get_filepath_str

    path = get_filepath_str(filepath, protocol) if protocol else str(filepath)
    if protocol in (None, "file", "local"):
        return str(path)
    return f"{protocol}://{path}"
