"""Two runs filling one step cache at once: two ``run-local --cache on`` processes started
together, on two copies of the project sharing one storage root, compute the same keys and race
to record them. Whatever the interleaving, the index they leave is consistent (every entry whole,
every output it names there with the fingerprint it records, no temporary file left) and a third
run, from a third copy, is served every step with the outputs a run makes."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from integration.conftest import KVX, make_cache_project, step_env
from integration.test_cache_run import STEPS, run_local, table
from kvx_runtime.cache.key import fingerprint_path
from kvx_runtime.cache.store import CACHE_DIR, CacheEntry
from kvx_runtime.storage.store import BlobStore

# Not `kedro`: the Kedro-facing paths of the cache run on the oldest Kedro in test_cache_run and
# test_cache_key; these search the cache's own logic, once.
pytestmark = [pytest.mark.slow]

TABLE = "label,total\nTotal,12\n"


def check_index(root: Path) -> dict[str, CacheEntry]:
    """Every entry and step record parses, is named by its key, and names outputs that are what
    it recorded; no temporary file is left. Returns step -> its entry."""
    cache = root / CACHE_DIR
    files = [path for path in cache.rglob("*") if path.is_file()]
    leftovers = [str(path) for path in files if path.name.startswith(".") or path.suffix != ".json"]
    assert not leftovers, leftovers
    entries: dict[str, CacheEntry] = {}
    for path in sorted((cache / "entries").iterdir()):
        entry = CacheEntry.from_json(path.read_bytes())
        assert path.name == f"{entry.key}.json"
        assert entry.step not in entries, f"two keys for step {entry.step}: the copies' keys differ"
        entries[entry.step] = entry
        assert entry.outputs
        for name, output in entry.outputs.items():
            assert fingerprint_path(output["location"]) == (output["fingerprint"], None), (entry.step, name)
    assert set(entries) == STEPS
    for path in sorted((cache / "steps").iterdir()):
        last = CacheEntry.from_json(path.read_bytes())
        assert (cache / "entries" / f"{last.key}.json").is_file(), path
    return entries


def test_two_runs_filling_one_cache_at_once_leave_a_consistent_index_that_serves_a_third_run(
        tmp_path: Path) -> None:
    first = make_cache_project(tmp_path / "first")
    second = shutil.copytree(first, tmp_path / "second" / first.name)
    third = shutil.copytree(first, tmp_path / "third" / first.name)
    root = tmp_path / "storage"

    runs = [subprocess.Popen([*KVX, "run-local", "--job-name", job, "--cache", "on", "--storage-root", str(root)],
                             cwd=project, env=step_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for job, project in (("one", first), ("two", second))]
    for run in runs:
        out, err = run.communicate(timeout=300)
        assert run.returncode == 0, out[-2000:] + err[-3000:]
    assert table(first) == table(second) == TABLE
    entries = check_index(root)
    # Each entry was recorded by one of the two runs.
    assert {entry.job_name for entry in entries.values()} <= {"one", "two"}

    outcome = run_local(third, "three", "--cache", "on", "--storage-root", str(root))
    assert outcome == dict.fromkeys(STEPS, "served")
    assert table(third) == TABLE
    store = BlobStore(str(root), "three")
    assert (store.load("cleaned"), store.load("total")) == ([2, 4, 6], 12)
    # Serving recorded nothing new, and left the index as consistent as it was.
    assert check_index(root) == entries
