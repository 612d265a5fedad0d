"""One measurement in a fresh process (so that peak RSS belongs to that operation alone).

    python bench/worker.py save|load FORMAT OBJECT SIZE_MB ROOT

Prints one JSON line: seconds, stored bytes, object bytes, and the peak RSS of the operation
relative to the object's size (1.0 = no memory beyond the object itself).
Formats: ``kvx`` (kvx-runtime blobs), ``bz2`` (the plugin family's reference: a bz2 stream
of cloudpickle), ``pickle`` (raw cloudpickle, protocol 5: the floor).
"""

from __future__ import annotations

import bz2
import json
import os
import resource
import sys
import time
from typing import Any


def rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_rss() -> None:
    """Linux: writing 5 to clear_refs resets the peak RSS (VmHWM) of this process."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:  # pragma: no cover - other kernels: the peak then includes set-up
        pass


def peak_rss_bytes() -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def make_object(kind: str, size_mb: float) -> Any:
    import numpy as np

    rng = np.random.default_rng(0)
    if kind == "dataframe":
        import pandas as pd

        rows = int(size_mb * 1024 * 1024 / 44)
        codes = rng.integers(0, 1_000_000, rows)
        return pd.DataFrame({
            "f": rng.random(rows),
            "i": rng.integers(0, 1 << 40, rows),
            "t": pd.to_datetime(rng.integers(1_500_000_000, 1_800_000_000, rows), unit="s"),
            "s": pd.Series(codes).map("item-{:06d}".format),
        })
    if kind == "array":
        return rng.random(int(size_mb * 1024 * 1024 / 4), dtype=np.float32)
    if kind == "model":
        layers = max(1, int(size_mb * 1024 * 1024 / (128 * 128 * 4 + 512)))
        return {
            "layers": {
                f"layer_{i}": {"weights": rng.standard_normal((128, 128)).astype(np.float32),
                               "bias": rng.standard_normal(128).astype(np.float32),
                               "config": {"activation": "relu", "index": i}}
                for i in range(layers)
            },
            "meta": {"name": "model", "classes": list(range(10))},
        }
    raise SystemExit(f"unknown object kind {kind}")


def object_bytes(obj: Any) -> int:
    import numpy as np

    if type(obj).__name__ == "DataFrame":
        return int(obj.memory_usage(deep=True).sum())
    if isinstance(obj, np.ndarray):
        return int(obj.nbytes)
    if isinstance(obj, dict):
        return sum(object_bytes(v) for v in obj.values())
    return 0


def _filesystem(root: str) -> tuple[Any, str]:
    import fsspec

    return fsspec.core.url_to_fs(root)


def _path(root: str, fmt: str, kind: str) -> str:
    return f"{root.rstrip('/')}/bench-{fmt}-{kind}.bin"


def save(fmt: str, obj: Any, root: str, kind: str) -> int:
    import cloudpickle

    if fmt == "kvx":
        from kvx_runtime.storage.store import BlobStore

        return BlobStore(root, "bench").save(f"{kind}", obj).stored_bytes
    fs, _ = _filesystem(root)
    path = _path(root, fmt, kind)
    block = int(os.environ.get("KVX_STORAGE_BLOCK_SIZE", 16 * 1024 * 1024))
    with fs.open(path, "wb", block_size=block) as handle:
        if fmt == "bz2":
            with bz2.BZ2File(handle, "wb") as compressed:
                cloudpickle.dump(obj, compressed, protocol=5)
        else:
            cloudpickle.dump(obj, handle, protocol=5)
    return int(fs.size(path))


def load(fmt: str, root: str, kind: str) -> Any:
    import pickle

    if fmt == "kvx":
        from kvx_runtime.storage.store import BlobStore

        return BlobStore(root, "bench").load(kind)
    fs, _ = _filesystem(root)
    block = int(os.environ.get("KVX_STORAGE_BLOCK_SIZE", 16 * 1024 * 1024))
    import io

    with fs.open(_path(root, fmt, kind), "rb", block_size=block) as raw:
        # Large sequential reads, as any sane reader of a remote file would do.
        handle = io.BufferedReader(raw, buffer_size=8 * 1024 * 1024) if "://" in root else raw
        if fmt == "bz2":
            with bz2.BZ2File(handle, "rb") as compressed:
                return pickle.load(compressed)
        return pickle.load(handle)


def main() -> None:
    action, fmt, kind, size_mb, root = sys.argv[1:6]
    import numpy  # noqa: F401 - the baseline includes the libraries, not the object

    if kind == "dataframe":
        import pandas  # noqa: F401

    import gc

    import kvx_runtime.storage.store  # noqa: F401

    if root.startswith("gs://"):
        import gcsfs  # noqa: F401 - a library, like numpy: in the baseline, not in the operation

    baseline = rss_bytes()
    if action == "save":
        obj = make_object(kind, float(size_mb))
        size = object_bytes(obj)
        gc.collect()
        reset_peak_rss()  # the peak measured is the save's, on top of the object itself
        before = rss_bytes()
        started = time.perf_counter()
        stored = save(fmt, obj, root, kind)
        seconds = time.perf_counter() - started
    else:
        reset_peak_rss()
        before = rss_bytes()
        started = time.perf_counter()
        obj = load(fmt, root, kind)
        seconds = time.perf_counter() - started
        size = object_bytes(obj)
        stored = 0
    # Memory the operation needed beyond what the process held before it: for a save the
    # object already exists, for a load it is what the loaded object (and any copies) took.
    extra = peak_rss_bytes() - before
    print(json.dumps({"seconds": seconds, "stored_bytes": stored, "object_bytes": size,
                      "baseline_rss": baseline, "extra_rss": extra,
                      "rss_ratio": (size + extra) / size if action == "save" else extra / size}))


if __name__ == "__main__":
    main()
