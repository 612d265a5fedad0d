"""The blob format: round trips of the kinds of objects that cross steps, and every way a
blob can be unusable (each must give a clear error naming the blob, never a traceback from
the unpickler)."""

from __future__ import annotations

import io
import json
import struct
import threading
import zlib

import numpy as np
import pandas as pd
import pytest
from sklearn.linear_model import LinearRegression

from kvx_runtime.errors import ExitCode
from kvx_runtime.storage.blob import (
    FRAME_SIZE,
    MAGIC,
    BlobCorrupt,
    BlobIncompatible,
    BlobUnpicklable,
    read_blob,
    write_blob,
)


def roundtrip(obj):
    buffer = io.BytesIO()
    info = write_blob(obj, buffer, dataset="ds")
    data = buffer.getvalue()
    assert info.stored_bytes == len(data)
    loaded, read_info = read_blob(io.BytesIO(data), len(data), describe="ds at test")
    assert read_info.pickled_bytes == info.pickled_bytes
    return loaded, data


def test_dataframe_of_mixed_dtypes_roundtrips() -> None:
    frame = pd.DataFrame(
        {
            "f": np.linspace(0, 1, 5000),
            "i": np.arange(5000),
            "s": [f"row {i}" for i in range(5000)],
            "t": pd.date_range("2024-01-01", periods=5000, freq="min"),
            "c": pd.Categorical(["a", "b"] * 2500),
        }
    )
    loaded, _ = roundtrip(frame)
    pd.testing.assert_frame_equal(loaded, frame)


def test_numpy_array_roundtrips_with_dtype_and_shape() -> None:
    array = np.random.default_rng(1).random((300, 70), dtype=np.float32)
    loaded, _ = roundtrip(array)
    assert loaded.dtype == np.float32 and loaded.shape == (300, 70)
    np.testing.assert_array_equal(loaded, array)


def test_model_object_roundtrips_and_predicts() -> None:
    x = np.arange(20, dtype=float).reshape(10, 2)
    model = LinearRegression().fit(x, x @ [2.0, -1.0] + 3)
    loaded, _ = roundtrip({"model": model, "meta": {"features": ["a", "b"]}})
    np.testing.assert_allclose(loaded["model"].predict(x), model.predict(x))
    assert loaded["meta"] == {"features": ["a", "b"]}


def test_closure_roundtrips_with_captured_state() -> None:
    offset = np.array([1.0, 2.0])

    def shift(values):
        return values + offset

    loaded, _ = roundtrip(shift)
    np.testing.assert_array_equal(loaded(np.zeros(2)), [1.0, 2.0])


def test_compressible_data_is_stored_smaller_than_pickled() -> None:
    buffer = io.BytesIO()
    info = write_blob(np.zeros(1_000_000), buffer)
    assert info.stored_bytes < info.pickled_bytes / 50


@pytest.fixture
def blob_bytes() -> bytes:
    buffer = io.BytesIO()
    write_blob({"values": list(range(20000))}, buffer, dataset="ds")
    return buffer.getvalue()


def read(data: bytes):
    return read_blob(io.BytesIO(data), len(data), describe="dataset 'ds' at gs://b/ds.bin")


def test_truncated_blob_is_reported_before_unpickling(blob_bytes: bytes) -> None:
    with pytest.raises(BlobCorrupt, match=r"dataset 'ds' at gs://b/ds\.bin: truncated"):
        read(blob_bytes[: len(blob_bytes) // 2])


def test_blob_cut_inside_the_header_is_truncated(blob_bytes: bytes) -> None:
    with pytest.raises(BlobCorrupt, match="truncated"):
        read(blob_bytes[:20])


def test_flipped_bit_in_body_is_detected_by_the_checksum(blob_bytes: bytes) -> None:
    corrupt = bytearray(blob_bytes)
    corrupt[len(corrupt) // 2] ^= 0x10
    with pytest.raises(BlobCorrupt, match="gs://b/ds.bin") as caught:
        read(bytes(corrupt))
    assert caught.value.exit_code == ExitCode.USAGE


def test_damaged_header_fails_its_checksum(blob_bytes: bytes) -> None:
    corrupt = bytearray(blob_bytes)
    corrupt[len(MAGIC) + 6] ^= 0x01
    with pytest.raises(BlobCorrupt, match="header checksum"):
        read(bytes(corrupt))


def test_foreign_file_is_not_a_blob() -> None:
    import bz2
    import pickle

    reference_format = bz2.compress(pickle.dumps([1, 2, 3]))  # what the plugin family stores
    with pytest.raises(BlobCorrupt, match="not a kvx-runtime blob"):
        read(reference_format)


def test_empty_object_is_reported() -> None:
    with pytest.raises(BlobCorrupt, match="empty"):
        read(b"")


def _rewrite_header(data: bytes, **changes) -> bytes:
    (length,) = struct.unpack_from("<I", data, len(MAGIC))
    start = len(MAGIC) + 4
    header = json.loads(data[start : start + length])
    header.update(changes)
    new = json.dumps(header).encode()
    body = data[start + length + 4 :]
    return MAGIC + struct.pack("<I", len(new)) + new + struct.pack("<I", zlib.crc32(new)) + body


def test_newer_format_version_is_incompatible(blob_bytes: bytes) -> None:
    with pytest.raises(BlobIncompatible, match="format version 99"):
        read(_rewrite_header(blob_bytes, format=99))


def test_other_python_minor_version_is_incompatible(blob_bytes: bytes) -> None:
    with pytest.raises(BlobIncompatible, match=r"written by Python 3\.99\.0.*same Python minor"):
        read(_rewrite_header(blob_bytes, python="3.99.0"))


def test_unknown_codec_is_incompatible(blob_bytes: bytes) -> None:
    with pytest.raises(BlobIncompatible, match="unknown codec 'lz4'"):
        read(_rewrite_header(blob_bytes, codec="lz4"))


def test_object_that_cannot_be_pickled_names_the_dataset() -> None:
    with pytest.raises(BlobUnpicklable, match="output 'locks' cannot be pickled") as caught:
        write_blob({"lock": threading.Lock()}, io.BytesIO(), dataset="locks")
    assert caught.value.exit_code == ExitCode.NODE_FAILED
    assert "spark.SparkDataset" in str(caught.value) and "run_config.grouping" in str(caught.value)


class _RefusesPickling:
    """Like a Spark DataFrame: pickling raises an exception of its own kind."""

    def __reduce__(self):
        raise RuntimeError("It appears that you are attempting to reference SparkContext")


def test_any_exception_while_pickling_is_the_outputs_problem() -> None:
    with pytest.raises(BlobUnpicklable, match=r"output 'table' .*RuntimeError: It appears") as caught:
        write_blob({"frame": _RefusesPickling()}, io.BytesIO(), dataset="table")
    assert caught.value.exit_code == ExitCode.NODE_FAILED


class _BrokenSink(io.RawIOBase):
    """Accepts the header, then fails like a dropped upload connection."""

    def __init__(self) -> None:
        self.written = 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        if self.written > 1024:
            raise ConnectionResetError("connection reset by peer")
        self.written += len(data)
        return len(data)


def test_a_failing_sink_is_not_blamed_on_the_object() -> None:
    # Large enough that frames reach the sink while pickling is still under way.
    with pytest.raises(ConnectionResetError):
        write_blob({"data": bytes(40 * 1024 * 1024)}, _BrokenSink(), dataset="big")


def test_missing_class_on_load_is_incompatible_not_a_traceback() -> None:
    import sys
    import types

    # An importable class is pickled by reference; a reader without its module cannot load it.
    module = types.ModuleType("kvx_vanishing_module")

    class Thing:
        pass

    Thing.__module__ = "kvx_vanishing_module"
    Thing.__qualname__ = "Thing"
    module.Thing = Thing  # type: ignore[attr-defined]
    sys.modules["kvx_vanishing_module"] = module
    buffer = io.BytesIO()
    try:
        write_blob(Thing(), buffer)
    finally:
        del sys.modules["kvx_vanishing_module"]
    with pytest.raises(BlobIncompatible, match="needs code this image does not have"):
        read(buffer.getvalue())


# --- the frame layout: large objects span many independent frames ------------------------


def _frames(data: bytes) -> list[tuple[int, int, int]]:
    """(offset, stored length, raw length) of every frame of a blob, end marker excluded."""
    (length,) = struct.unpack_from("<I", data, len(MAGIC))
    offset = len(MAGIC) + 4 + length + 4
    frames = []
    while True:
        stored, raw = struct.unpack_from("<II", data, offset)
        if stored == 0:
            return frames
        frames.append((offset, stored, raw))
        offset += 8 + stored


def test_large_objects_span_many_frames_and_roundtrip_exactly() -> None:
    rng = np.random.default_rng(7)
    # Buffers bigger than a frame (decompressed in place on load), small objects between them
    # (frames that straddle pickle opcodes), and a tail shorter than a frame.
    obj = {
        "big": rng.random(1_500_000),  # ~11 MiB
        "names": [f"n{i}" for i in range(50_000)],
        "odd": rng.integers(0, 255, FRAME_SIZE + 12_345, dtype=np.uint8),
        "small": np.arange(10),
    }
    loaded, data = roundtrip(obj)
    frames = _frames(data)
    assert len(frames) >= 7
    assert all(raw <= FRAME_SIZE for _, _, raw in frames)
    np.testing.assert_array_equal(loaded["big"], obj["big"])
    np.testing.assert_array_equal(loaded["odd"], obj["odd"])
    assert loaded["names"] == obj["names"] and list(loaded["small"]) == list(range(10))


@pytest.fixture
def large_blob() -> bytes:
    buffer = io.BytesIO()
    write_blob(np.random.default_rng(3).random(1_000_000), buffer, dataset="ds")
    return buffer.getvalue()


def test_flipped_bit_in_a_later_frame_is_detected(large_blob: bytes) -> None:
    offset, stored, _ = _frames(large_blob)[-1]
    corrupt = bytearray(large_blob)
    corrupt[offset + 8 + stored // 2] ^= 0x04
    with pytest.raises(BlobCorrupt, match=r"gs://b/ds\.bin: compressed data is corrupt"):
        read(bytes(corrupt))


def test_damaged_frame_length_is_reported_not_allocated(large_blob: bytes) -> None:
    offset, _, _ = _frames(large_blob)[1]
    corrupt = bytearray(large_blob)
    struct.pack_into("<I", corrupt, offset + 4, 0xFFFFFFFF)  # an absurd raw length
    with pytest.raises(BlobCorrupt, match="damaged frame header"):
        read(bytes(corrupt))


def test_frame_shorter_than_its_recorded_length_is_corrupt(large_blob: bytes) -> None:
    offset, _, raw = _frames(large_blob)[0]
    corrupt = bytearray(large_blob)
    struct.pack_into("<I", corrupt, offset + 4, raw - 1)
    with pytest.raises(BlobCorrupt, match="gs://b/ds.bin"):
        read(bytes(corrupt))


def test_frames_after_the_pickle_ends_are_corrupt(blob_bytes: bytes) -> None:
    # A whole valid frame slipped in before the end marker, with a trailer to match: the pickle
    # is complete without it, so the reader must notice the leftover bytes.
    import zstandard

    extra = zstandard.ZstdCompressor(write_checksum=True).compress(b"trailing garbage")
    end_marker = len(blob_bytes) - 24 - 8
    body_end = blob_bytes[:end_marker] + struct.pack("<II", len(extra), 16) + extra
    body_end += blob_bytes[end_marker : end_marker + 8]
    (header_length,) = struct.unpack_from("<I", blob_bytes, len(MAGIC))
    body_length = len(body_end) - (len(MAGIC) + 4 + header_length + 4)
    (pickled,) = struct.unpack_from("<Q", blob_bytes, len(blob_bytes) - 8)
    trailer = struct.pack("<8sQQ", b"KVXEND01", body_length, pickled)
    with pytest.raises(BlobCorrupt, match="decompressed"):
        read(body_end + trailer)


def test_version_1_blobs_are_refused_with_a_clear_message(blob_bytes: bytes) -> None:
    with pytest.raises(BlobIncompatible, match="format version 1 is not supported.*reads version 2"):
        read(_rewrite_header(blob_bytes, format=1))


def test_header_with_unknown_fields_of_a_future_version_names_the_version(blob_bytes: bytes) -> None:
    with pytest.raises(BlobIncompatible, match="format version 3"):
        read(_rewrite_header(blob_bytes, format=3, frame_index="footer"))


# --- columns that pickle itself would copy ------------------------------------------------


def test_datetime_and_timedelta_arrays_roundtrip_in_every_layout() -> None:
    stamps = (np.arange(24, dtype=np.int64) * 3_600_000_000).astype("M8[us]").reshape(4, 6)
    arrays = {
        "c_order": stamps,
        "f_order": np.asfortranarray(stamps),
        "strided": stamps[:, ::2],  # not contiguous: numpy's own (copying) path
        "big_endian": stamps.astype(">M8[us]"),
        "timedelta": np.diff(stamps.ravel()),
        "scalar_array": np.array(np.datetime64("2024-02-29T12:00", "s")),
        "with_nat": np.array(["2024-01-01", "NaT"], dtype="M8[D]"),
    }
    loaded, _ = roundtrip(arrays)
    for name, original in arrays.items():
        assert loaded[name].dtype == original.dtype, name
        assert loaded[name].shape == original.shape, name
        np.testing.assert_array_equal(loaded[name], original)
    assert loaded["f_order"].flags.f_contiguous


def test_datetime_arrays_are_pickled_as_a_view_not_a_copy() -> None:
    from kvx_runtime.storage.blob import _datetime_array_reduction

    stamps = np.arange(1000).astype("M8[ns]")
    _, (as_integers, dtype) = _datetime_array_reduction(stamps)
    assert np.shares_memory(as_integers, stamps) and dtype == stamps.dtype
    assert _datetime_array_reduction(np.arange(10)) is None  # numeric arrays: numpy's own path


def test_arrow_backed_columns_roundtrip_single_and_multi_chunk() -> None:
    import pyarrow as pa

    single = pd.Series([f"s{i}" for i in range(1000)] + [None], dtype="str")
    chunked = pd.Series(pd.arrays.ArrowExtensionArray(pa.chunked_array([["a", "b"], ["c", None]])))
    sliced = single.iloc[10:20]
    frame = pd.DataFrame(
        {
            "s": single,
            "t": pd.date_range("2024-01-01", periods=1001, freq="h", tz="Europe/Paris"),
            "n": pd.Series(range(1001), dtype="int64[pyarrow]"),
        }
    )
    loaded, _ = roundtrip({"frame": frame, "chunked": chunked, "sliced": sliced})
    pd.testing.assert_frame_equal(loaded["frame"], frame)
    pd.testing.assert_series_equal(loaded["chunked"], chunked)
    pd.testing.assert_series_equal(loaded["sliced"], sliced)


def test_single_chunk_arrow_arrays_are_pickled_without_combining_chunks() -> None:
    from kvx_runtime.storage.blob import _arrow_array_reduction

    array = pd.Series([f"value {i}" for i in range(100)], dtype="str").array
    if not hasattr(array, "_pa_array"):
        pytest.skip("pandas stores these strings without pyarrow here")
    _, _, state = _arrow_array_reduction(array)
    chunk = array._pa_array.chunk(0)
    assert state["_pa_array"].buffers()[2].address == chunk.buffers()[2].address  # same memory


def test_a_few_rows_of_a_big_arrow_column_store_only_those_rows() -> None:
    column = pd.Series([f"value {i}" for i in range(200_000)], dtype="str")
    for rows in (column.iloc[:10], column.iloc[1000:1010]):
        loaded, data = roundtrip(rows)
        pd.testing.assert_series_equal(loaded, rows)
        assert len(data) < 20_000  # not the column's ~3 MB of buffers


class _RefusesRebuilding:
    """Pickles fine; its own code refuses to rebuild it (as a library of another version may)."""

    def __init__(self, error: type[Exception]) -> None:
        self.error = error

    def __setstate__(self, state: dict) -> None:
        raise state["error"]("state written by another version")


@pytest.mark.parametrize("error", [TypeError, ValueError, KeyError, ImportError])
def test_intact_bytes_the_objects_code_refuses_are_incompatible_not_damaged_nor_a_storage_error(
        error: type[Exception]) -> None:
    # Exit 2 (every retry reads the same bytes), never "pickle stream is damaged" for bytes that
    # passed every check, nor a storage failure worth a retry (exit 3).
    buffer = io.BytesIO()
    write_blob({"model": _RefusesRebuilding(error)}, buffer, dataset="model")
    data = buffer.getvalue()
    with pytest.raises(BlobIncompatible, match="stored bytes are intact") as raised:
        read_blob(io.BytesIO(data), len(data), describe="dataset 'model' at gs://b/model.bin")
    assert raised.value.exit_code == ExitCode.USAGE and error.__name__ in str(raised.value)
