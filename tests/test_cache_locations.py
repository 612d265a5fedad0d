"""Where the step cache serves a catalog output to: told from the catalog's configuration for the
plain file types (no import of the type's package), the same place as the dataset built says."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from conftest import fresh_python
from kvx_runtime.cache.store import PLAIN_FILE_TYPES, configured_location, dataset_location
from kvx_runtime.step.hooks import dataset_config

pytestmark = pytest.mark.kedro

FILEPATHS = ("data/08_reporting/out.bin", "/abs/out.bin", "file:///abs/out.bin", "gs://bucket/prefix/out.bin",
             "s3://bucket/out.bin", "data/a folder/with spaces.bin")
#: What a type needs beside its filepath to be built.
REQUIRED = {"pandas.GenericDataset": {"file_format": "csv"}, "pandas.HDFDataset": {"key": "data"}}
#: Anonymous file systems: building the dataset must not look for cloud credentials.
ANONYMOUS = {"gs": {"token": "anon"}, "s3": {"anon": True}}


def _entry(kind: str, filepath: str) -> dict[str, Any]:
    entry = {"type": kind, "filepath": filepath, **REQUIRED.get(kind.removeprefix("kedro_datasets."), {})}
    protocol = filepath.partition("://")[0]
    if protocol in ANONYMOUS:
        entry["credentials"] = ANONYMOUS[protocol]
    return entry


def _catalog(config: dict[str, Any]) -> Any:
    from kedro.io import DataCatalog

    return DataCatalog.from_config(config)


@pytest.mark.parametrize("kind", sorted(PLAIN_FILE_TYPES))
def test_a_plain_file_type_is_where_the_dataset_built_would_save(kind: str) -> None:
    pytest.importorskip(f"kedro_datasets.{kind.rsplit('.', 1)[0]}")
    config = {f"out{index}": _entry(kind, path) for index, path in enumerate(FILEPATHS)}
    config["full_name"] = _entry(f"kedro_datasets.{kind}", "gs://bucket/full.bin")
    config["{name}_pattern"] = _entry(kind, "s3://bucket/{name}.bin")
    catalog = _catalog(config)
    for name in [*config.keys() - {"{name}_pattern"}, "made_pattern"]:
        told = configured_location(dataset_config(catalog, name))
        assert told is not None, name
        assert told == dataset_location(catalog.get(name)), name


def test_what_the_configuration_cannot_tell_is_left_to_the_dataset_built() -> None:
    catalog = _catalog({
        "versioned": {"type": "pandas.CSVDataset", "filepath": "data/v.csv", "versioned": True},
        "partitioned": {"type": "partitions.PartitionedDataset", "path": "data/parts", "dataset": "pandas.CSVDataset"},
        "custom": {"type": "my_package.datasets.CSVDataset", "filepath": "data/c.csv"},
        "memory": {"type": "MemoryDataset"},
    })
    for name in ("versioned", "partitioned", "custom", "memory"):
        assert configured_location(dataset_config(catalog, name)) is None, name
    assert configured_location(None) is None
    catalog.get("memory")
    assert dataset_config(catalog, "memory") is None  # built: its configuration is gone


def test_telling_a_location_imports_no_dataset_package(tmp_path: Path) -> None:
    script = (
        "import sys\n"
        "from kedro.io import DataCatalog\n"
        "from kvx_runtime.cache.store import configured_location\n"
        "from kvx_runtime.step.hooks import dataset_config\n"
        "catalog = DataCatalog.from_config({'t': {'type': 'pandas.CSVDataset', 'filepath': 'gs://b/t.csv'}})\n"
        "print(configured_location(dataset_config(catalog, 't')))\n"
        "print(sorted(name for name in sys.modules if name.startswith('kedro_datasets.pandas')))\n"
    )
    assert fresh_python(script, cwd=tmp_path)[0] == ["gs://b/t.csv", "[]"]


def test_a_folder_served_onto_an_existing_one_replaces_it_on_an_object_store() -> None:
    # fsspec copies a folder onto an existing one as cp -r does: into it, beside the old files,
    # which readers of the destination would read. The destination is this run's, whole.
    import fsspec

    from kvx_runtime.cache.key import fingerprint_path
    from kvx_runtime.cache.store import _copy

    memory = fsspec.filesystem("memory")
    for path, data in {"/kvx-serve/src/d/p=1/a.parquet": b"NEW", "/kvx-serve/dst/d/p=1/a.parquet": b"OLD",
                       "/kvx-serve/dst/d/p=2/b.parquet": b"STALE"}.items():
        memory.pipe_file(path, data)
    try:
        _copy("memory://kvx-serve/src/d", "memory://kvx-serve/dst/d", fingerprint_path("memory://kvx-serve/src/d")[0])
        assert {path: memory.cat_file(path) for path in memory.find("/kvx-serve/dst")} == {
            "/kvx-serve/dst/d/p=1/a.parquet": b"NEW"}
    finally:
        memory.rm("/kvx-serve", recursive=True)


def test_an_output_served_onto_itself_spelled_another_way_is_left_as_is() -> None:
    # The same object as gcs:// in the entry and gs:// in this run's catalog (or s3a:// and
    # s3://): a copy onto itself, then the source found changed, would remove the only copy.
    import fsspec

    from kvx_runtime.cache.key import fingerprint_path
    from kvx_runtime.cache.store import CacheEntry, StepCache

    memory = fsspec.filesystem("memory")
    memory.pipe_file("/kvx-same/out.csv", b"a\n1\n")
    entry = CacheEntry(key="k", step="s", nodes=("s",), run_id="r", job_name="j", created="c", parts={},
                       outputs={"out": {"location": "memory://kvx-same/out.csv",
                                        "fingerprint": fingerprint_path("memory://kvx-same/out.csv")[0]}})
    try:
        cache = StepCache("memory://kvx-same-root")
        assert cache.serve(entry, {"out": "memory:///kvx-same/out.csv"}) == []
        assert memory.cat_file("/kvx-same/out.csv") == b"a\n1\n"
    finally:
        memory.rm("/kvx-same", recursive=True)
