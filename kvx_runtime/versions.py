"""One save version per pipeline run for Kedro's versioned datasets.

A plain ``kedro run`` saves every versioned dataset with one version (the session's
timestamp) and loads "the latest" of the others. Split into steps, every step would pick its
own timestamp, and a step loading a dataset that an earlier step of the same run saved would
load whatever is newest, possibly another run's. So a pipeline run has one save version,
derived from the run's creation time (``{{$.pipeline_job_create_time_utc}}`` on Vertex AI and
KFP, the same value for every step; run-local passes its own start time), in Kedro's version
format so that "latest" keeps its meaning for readers outside the run. Steps load the inputs
that an earlier step of the run saved at that version; explicit load versions still win.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from datetime import datetime, timedelta, timezone
from typing import Any

from kvx_runtime.errors import InputDataError, UsageError
from kvx_runtime.log import get_logger

__all__ = [
    "SAVE_VERSION_PARAMETER",
    "kedro_version",
    "parse_load_versions",
    "recorded_save_version",
    "remove_earlier_attempt",
    "resolve_save_version",
    "run_load_versions",
    "unresolved",
]

log = get_logger(__name__)

#: The spec's pipeline parameter for the run's save version (empty: the job's creation time).
SAVE_VERSION_PARAMETER = "kvx_save_version"
_KEDRO_VERSION = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}\.\d{2}\.\d{2}\.\d{3}Z$")
_RFC3339 = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?(?:([Zz])|([+-])(\d{2}):?(\d{2}))?$"
)


def kedro_version(text: str, *, given_as: str = "--save-version") -> str:
    """A Kedro version string (``2026-11-24T10.15.00.123Z``) from itself or an RFC 3339 time
    (``2026-11-24T10:15:00.123456Z``, what Vertex AI and KFP put in the create-time placeholder);
    ``given_as`` names where the text came from in the error.
    """
    value = text.strip()
    if _KEDRO_VERSION.match(value):
        return value
    match = _RFC3339.match(value)
    moment = _moment(match) if match else None
    if moment is None:
        shown = value if len(value) <= 60 else value[:57] + "..."
        raise UsageError(
            f"{given_as} {shown!r} is neither a Kedro version (2026-11-24T10.15.00.123Z) "
            "nor an RFC 3339 time (2026-11-24T10:15:00Z)",
            hint="an unresolved {{$...}} placeholder means the orchestrator does not fill "
            "pipeline_job_create_time_utc: pass --save-version explicitly",
        )
    stamp = moment.strftime("%Y-%m-%dT%H.%M.%S.%f")
    return stamp[:-3] + "Z"  # milliseconds, as Kedro's own generate_timestamp()


def _moment(match: re.Match[str]) -> datetime | None:
    """The UTC time an RFC 3339 match names; None for one the calendar does not have (month 13)."""
    year, month, day, hour, minute, second, fraction, _zulu, sign, off_h, off_m = match.groups()
    micros = int((fraction or "0").ljust(6, "0")[:6])
    try:
        moment = datetime(int(year), int(month), int(day), int(hour), int(minute), int(second), micros,
                          tzinfo=timezone.utc)
        if sign:
            offset = timedelta(hours=int(off_h), minutes=int(off_m))
            moment = moment - offset if sign == "+" else moment + offset
    except (ValueError, OverflowError):
        return None
    return moment


def unresolved(value: str | None) -> bool:
    """A value the orchestrator left as it was compiled (``{{$...}}``), or left empty."""
    return value is None or not value.strip() or value.strip().startswith("{{$")


def resolve_save_version(explicit: str | None, job_create_time: str | None) -> tuple[str | None, str | None]:
    """The run's save version: ``explicit`` (``--save-version``, the spec's ``kvx_save_version``)
    unless empty, else the job's creation time. Returns ``(version, None)``, or ``(None, why)``
    when neither is there (KFP releases that leave ``pipeline_job_create_time_utc`` unfilled)."""
    if not unresolved(explicit):
        return kedro_version(str(explicit)), None
    if job_create_time is None:
        return None, None  # not asked for: one version per process, as in kedro run
    if not unresolved(job_create_time):
        return kedro_version(job_create_time, given_as="--job-create-time"), None
    return None, f"the orchestrator did not fill the job's creation time ({job_create_time.strip() or 'empty'})"


#: The job directory's record of the run's save version (not a blob: no ``.bin`` suffix).
RUN_VERSION_RECORD = "run-version.json"


def recorded_save_version(store: Any, run_id: str, *, now: datetime | None = None) -> str:
    """The run's save version as its job directory records it; the first step to ask records
    ``now``. ``store`` is the run's :class:`~kvx_runtime.storage.store.BlobStore`.

    A record of another run means two runs share one job directory (their intermediates too):
    refused rather than mixing their versions.
    """
    moment = now or datetime.now(timezone.utc)
    candidate = kedro_version(moment.isoformat().replace("+00:00", "Z"))
    ours = json.dumps({"format": 1, "run_id": run_id, "save_version": candidate}, sort_keys=True).encode()
    raw = store.first_record(RUN_VERSION_RECORD, ours)
    where = f"{store.job_url}/{RUN_VERSION_RECORD}"
    try:
        record = json.loads(raw)
        recorded_run, version = str(record["run_id"]), kedro_version(str(record["save_version"]))
    except (ValueError, KeyError, TypeError, UsageError):
        raise InputDataError(f"the run version record {where} is unreadable",
                             hint="delete it only if no step of this run has saved a versioned dataset yet") from None
    if recorded_run != run_id:
        raise UsageError(
            f"the job directory of {store.job_name} records the save version of run {recorded_run}, "
            f"not of this run ({run_id}): two runs share one job directory",
            hint="give each run its own job name",
        )
    if version == candidate:
        log.info("this step recorded the run's save version", save_version=version, record=where)
    else:
        log.info("the run's save version, as its first step recorded it", save_version=version, record=where)
    return version


def parse_load_versions(items: Iterable[str]) -> dict[str, str]:
    """``--load-version dataset=version`` flags (Kedro's own format for the version)."""
    versions: dict[str, str] = {}
    for item in items:
        name, sep, version = item.partition("=")
        if not sep or not name.strip() or not version.strip():
            raise UsageError(f"--load-version {item!r} must look like dataset=version")
        versions[name.strip()] = version.strip()
    return versions


def _without_credentials(value: Any) -> Any:
    """The catalog config without ``credentials`` keys: deciding whether a dataset is
    versioned must neither need nor touch secrets."""
    if isinstance(value, Mapping):
        return {k: _without_credentials(v) for k, v in value.items() if k != "credentials"}
    if isinstance(value, list):
        return [_without_credentials(v) for v in value]
    return value


def versioned_names(catalog_config: Mapping[str, Any], names: Iterable[str]) -> list[str]:
    """Which of ``names`` the catalog declares ``versioned: true`` (explicitly or through a
    dataset factory that Kedro accepts ``load_versions`` for)."""
    from kedro.io import CatalogConfigResolver, DataCatalog

    resolver = CatalogConfigResolver(_without_credentials(dict(catalog_config)),
                                     default_runtime_patterns=DataCatalog.default_runtime_patterns)
    found = []
    for name in names:
        if name in resolver.config:
            config = resolver.config[name]
        elif resolver.match_dataset_pattern(name):
            config = resolver.resolve_pattern(name)
        else:
            continue
        if isinstance(config, Mapping) and config.get("versioned") is True:
            found.append(name)
    return sorted(found)


def run_load_versions(
    catalog_config: Mapping[str, Any],
    inputs: Iterable[str],
    save_version: str,
    explicit: Mapping[str, str],
) -> dict[str, str]:
    """Load versions for a step: its versioned ``inputs`` saved earlier in this run at
    ``save_version``, unless ``explicit`` names another version for them."""
    versions = {name: save_version for name in versioned_names(catalog_config, inputs)}
    versions.update(explicit)
    return versions


def remove_earlier_attempt(dataset: Any, name: str, save_version: str) -> bool:
    """Delete ``name``'s output at ``save_version`` if an earlier attempt of this step wrote it.

    Kedro refuses to save a version that exists; with one version per run, a retried step
    (after a transient failure, or replayed) would otherwise fail for ever on the output its
    first attempt saved. The version belongs to this run and this step is its only writer,
    so replacing it is what the retry means. Best effort: datasets without an fsspec
    filesystem are left to Kedro's own error.
    """
    from kedro.io.core import AbstractVersionedDataset, get_filepath_str

    inner = getattr(dataset, "_dataset", dataset)  # CachedDataset
    if not isinstance(inner, AbstractVersionedDataset) or not getattr(inner, "_version", None):
        return False
    if inner.resolve_save_version() != save_version:
        return False
    filesystem = getattr(inner, "_fs", None)
    if filesystem is None:
        return False
    path = get_filepath_str(inner._get_versioned_path(save_version), getattr(inner, "_protocol", "file"))
    try:
        if not filesystem.exists(path):
            return False
        filesystem.rm(path, recursive=True)
    except OSError as exc:
        log.warning("could not replace an earlier attempt's output", dataset=name, error=str(exc)[:200])
        return False
    log.warning(
        "an earlier attempt of this step saved this output at this run's version; replacing it",
        dataset=name,
        version=save_version,
    )
    return True
