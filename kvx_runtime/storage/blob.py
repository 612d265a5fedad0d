"""The intermediate blob format: a checked header, independent zstd frames, a trailer.

Layout (all integers little-endian)::

    magic            8 bytes   b"\\x89KVXBLB\\n"
    header length    4 bytes   uint32
    header           n bytes   UTF-8 JSON (format, codec, pickle protocol, versions, dataset)
    header crc32     4 bytes   uint32, of the header bytes
    frames           ...       per frame: uint32 stored length, uint32 raw length, one zstd
                               frame (with content checksum) of up to 2 MiB of pickle bytes
    end of frames    8 bytes   two zero uint32
    trailer         24 bytes   b"KVXEND01" + uint64 body length + uint64 pickle length

The body (frames and end marker) is the cloudpickle stream cut into independent zstd frames,
so that frames are compressed and decompressed on a thread pool in both directions (zstd
releases the GIL) while the pickler or unpickler works on the main thread. Each frame carries
its own content checksum, so a flipped bit is detected when its frame is decompressed; the
trailer's lengths detect truncation before any unpickling starts; the header says which
Python and cloudpickle wrote the blob, so an incompatible reader fails with a clear message
instead of an unpickling traceback.

Both directions stream with a bounded number of frames in flight, so memory stays close to the
object's size plus a few megabytes per worker thread.
"""

from __future__ import annotations

import copyreg
import io
import json
import os
import pickle
import struct
import sys
import threading
import zlib
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import IO, Any, BinaryIO, Protocol

import cloudpickle
import zstandard

from kvx_runtime import settings
from kvx_runtime.errors import ExitCode, InputDataError, KvxError

__all__ = [
    "FORMAT_VERSION",
    "BlobCorrupt",
    "BlobHeader",
    "BlobIncompatible",
    "BlobInfo",
    "BlobUnpicklable",
    "read_blob",
    "write_blob",
]

MAGIC = b"\x89KVXBLB\n"
TRAILER_MAGIC = b"KVXEND01"
FORMAT_VERSION = 2
_U32 = struct.Struct("<I")
_FRAME_PREFIX = struct.Struct("<II")
_TRAILER = struct.Struct("<8sQQ")
_MAX_HEADER = 64 * 1024
#: Pickle protocol 5 lets large buffers (numpy, pandas) go to the stream without copies.
PICKLE_PROTOCOL = 5
#: zstd level 1 (its home: settings.BLOB_LEVEL): on DataFrames and arrays it stores within 1%
#: of level 3's size in half the time (bench/); KVX_BLOB_LEVEL overrides it (1-19).
DEFAULT_LEVEL = settings.BLOB_LEVEL.default
#: Pickle bytes per zstd frame. Small enough that a few frames in flight per worker cost only
#: megabytes, large enough that per-frame overhead and the lost cross-frame matches do not show
#: (level 1 matches within 512 KiB anyway).
FRAME_SIZE = 2 * 1024 * 1024
#: The most a frame may take stored: zstd's worst case for FRAME_SIZE is far below this, so a
#: larger length prefix can only come from damage.
_MAX_STORED_FRAME = FRAME_SIZE + FRAME_SIZE // 8 + 64 * 1024
_MAX_THREADS = 8
_COPY_CHUNK = 1 << 20


class BlobCorrupt(InputDataError):
    """The blob is truncated, corrupt, or not a kvx blob at all."""


class BlobIncompatible(InputDataError):
    """The blob is intact but was written by an incompatible format, codec or Python."""


class BlobMismatch(InputDataError):
    """A valid blob, but of another dataset or job (copied or renamed by hand, a bug)."""

    #: The job the blob records (None: not the job that differs).
    found_job: str | None = None


class BlobUnpicklable(KvxError):
    """The node's output cannot be pickled, so it cannot cross to another step."""

    exit_code = ExitCode.NODE_FAILED


@dataclass(frozen=True)
class BlobHeader:
    """What the writer records about itself; checked by the reader before unpickling."""

    format: int
    codec: str
    level: int
    pickle_protocol: int
    python: str
    cloudpickle: str
    dataset: str | None = None
    #: The pipeline job that wrote it (absent in blobs written before it was recorded).
    job: str | None = None

    @classmethod
    def current(cls, *, dataset: str | None, level: int, job: str | None = None) -> BlobHeader:
        return cls(
            format=FORMAT_VERSION,
            codec="zstd",
            level=level,
            pickle_protocol=PICKLE_PROTOCOL,
            python=".".join(map(str, sys.version_info[:3])),
            cloudpickle=cloudpickle.__version__,
            dataset=dataset,
            job=job,
        )

    def to_bytes(self) -> bytes:
        return json.dumps(self.__dict__, sort_keys=True, separators=(",", ":")).encode()


@dataclass(frozen=True)
class BlobInfo:
    """Sizes of a blob written or read: ``stored`` bytes on storage, ``pickled`` bytes raw."""

    header: BlobHeader
    stored_bytes: int
    pickled_bytes: int


def _threads() -> int:
    # The CPUs this process may run on (a container's cpuset), not the host's count.
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(usable or 1, _MAX_THREADS))


class _FramePipeline:
    """Runs zstd work frame by frame on a thread pool, handing results back in order.

    At most ``window`` frames are in flight, which bounds the memory a blob needs beyond the
    object itself. Each worker thread keeps its own (de)compressor: zstd contexts are not
    thread-safe, and one per thread saves allocating a context for every frame.
    """

    def __init__(self, make_codec: Callable[[], Any]) -> None:
        threads = _threads()
        self.window = threads + 1
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="kvx-blob")
        self._local = threading.local()
        self._make_codec = make_codec
        self._pending: deque[tuple[Future[Any], int]] = deque()
        #: Raw (pickle) bytes of the frames in flight.
        self.pending_raw = 0

    def _run(self, operation: Callable[[Any, Any], Any], data: Any) -> Any:
        codec = getattr(self._local, "codec", None)
        if codec is None:
            codec = self._local.codec = self._make_codec()
        return operation(codec, data)

    def submit(self, operation: Callable[[Any, Any], Any], data: Any, raw_length: int) -> None:
        self._pending.append((self._pool.submit(self._run, operation, data), raw_length))
        self.pending_raw += raw_length

    def __len__(self) -> int:
        return len(self._pending)

    def next_result(self) -> tuple[Any, int]:
        """The oldest frame's result and raw length (waiting for it if needed)."""
        future, raw_length = self._pending.popleft()
        self.pending_raw -= raw_length
        return future.result(), raw_length

    def close(self) -> None:
        for future, _ in self._pending:
            future.cancel()
        self._pending.clear()
        self._pool.shutdown(wait=True)


def _compress_frame(compressor: zstandard.ZstdCompressor, data: Any) -> bytes:
    return compressor.compress(data)


class _FrameWriter(io.RawIOBase):
    """Receives the pickle stream; writes it to ``target`` as length-prefixed zstd frames.

    Small writes (the pickler's own framed output) are gathered into a frame buffer; large
    writes (protocol-5 buffers of arrays) are cut into frames without copying, and all of
    their frames are written before ``write`` returns, since the caller's buffer is only
    ours to read during the call.
    """

    def __init__(self, target: Sink, level: int) -> None:
        parameters = zstandard.ZstdCompressionParameters.from_level(
            level, write_checksum=1, write_content_size=1
        )
        self._frames = _FramePipeline(lambda: zstandard.ZstdCompressor(compression_params=parameters))
        self._target = target
        self._buffer = bytearray()
        self.pickled = 0
        self.stored = 0
        #: What the storage side raised, if anything: not the pickled object's fault.
        self.sink_error: BaseException | None = None

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        size = view.nbytes
        self.pickled += size
        if self._buffer or size < FRAME_SIZE:
            take = min(FRAME_SIZE - len(self._buffer), size)
            self._buffer += view[:take]
            view = view[take:]
            if len(self._buffer) == FRAME_SIZE:
                self._submit(bytes(self._buffer))
                self._buffer.clear()
        if view.nbytes >= FRAME_SIZE:
            while view.nbytes >= FRAME_SIZE:
                self._submit(view[:FRAME_SIZE])
                view = view[FRAME_SIZE:]
            self._drain(0)  # the caller's buffer must not be read after we return
        self._buffer += view
        return size

    def _submit(self, frame: Any) -> None:
        self._frames.submit(_compress_frame, frame, len(frame))
        self._drain(self._frames.window)

    def _drain(self, keep: int) -> None:
        while len(self._frames) > keep:
            stored, raw_length = self._frames.next_result()
            self._write_target(_FRAME_PREFIX.pack(len(stored), raw_length))
            self._write_target(stored)
            self.stored += _FRAME_PREFIX.size + len(stored)

    def _write_target(self, data: bytes) -> None:
        try:
            self._target.write(data)
        except BaseException as exc:
            self.sink_error = exc
            raise

    def finish(self) -> None:
        """Write the last partial frame and the end-of-frames marker."""
        if self._buffer:
            self._submit(bytes(self._buffer))
            self._buffer.clear()
        self._drain(0)
        self._write_target(_FRAME_PREFIX.pack(0, 0))
        self.stored += _FRAME_PREFIX.size

    def close(self) -> None:
        self._frames.close()
        super().close()


def _datetime_array_reduction(obj: Any) -> Any:
    """datetime64/timedelta64 arrays as their int64 view: numpy hands protocol 5 a zero-copy
    buffer for numeric arrays but copies datetime arrays (pandas' datetime columns among them)
    into a bytes object first. Viewing the int64 array back as the original dtype on load
    restores the same bytes, with numpy alone."""
    numpy = sys.modules.get("numpy")  # not imported: obj cannot be an array
    if (
        numpy is not None
        and type(obj) is numpy.ndarray
        and obj.dtype.kind in "mM"
        and (obj.flags.c_contiguous or obj.flags.f_contiguous)
    ):
        return numpy.ndarray.view, (obj.view(numpy.int64), obj.dtype)
    return None


def _arrow_array_reduction(obj: Any) -> Any:
    """pandas' Arrow-backed arrays (its default string columns) without their chunk copy:
    pandas' ``__getstate__`` calls ``combine_chunks()``, which copies even a single chunk.
    For one chunk the state below is what pandas writes minus that copy (the chunk's buffers
    then go to protocol 5 without copies); pandas' own ``__setstate__`` loads it. A chunk that
    is a slice of larger buffers keeps pandas' path: pyarrow pickles whole buffers, so a few
    rows of a big column would store the column."""
    arrow_arrays = sys.modules.get("pandas.core.arrays.arrow.array")
    base = getattr(arrow_arrays, "ArrowExtensionArray", None)
    if (
        base is None
        or not isinstance(obj, base)
        or type(obj).__getstate__ is not base.__getstate__  # a subclass pickles its own way
        or getattr(obj, "_pa_array", None) is None
        or obj._pa_array.num_chunks != 1
    ):
        return None
    chunk = obj._pa_array.chunk(0)
    unreferenced = chunk.get_total_buffer_size() - chunk.nbytes
    if unreferenced > max(4096, chunk.nbytes // 100):
        return None
    state = obj.__dict__.copy()
    state["_pa_array"] = chunk
    state["_cache"] = {}
    return copyreg.__newobj__, (type(obj),), state  # type: ignore[attr-defined]  # absent from typeshed


class _Pickler(cloudpickle.Pickler):
    """cloudpickle, minus the copies numpy and pandas make of some columns when pickled.

    The blob stays loadable by plain ``pickle`` with numpy and pandas alone.
    """

    def reducer_override(self, obj: Any) -> Any:
        reduction = _datetime_array_reduction(obj) or _arrow_array_reduction(obj)
        return reduction if reduction is not None else super().reducer_override(obj)


class Sink(Protocol):
    """Where a blob is written: anything with ``write`` (a file, an upload, a checksumming wrapper)."""

    def write(self, data: Any, /) -> Any: ...


def write_blob(
    obj: Any,
    target: Sink,
    *,
    dataset: str | None = None,
    level: int = DEFAULT_LEVEL,
    job: str | None = None,
) -> BlobInfo:
    """Pickle ``obj`` with cloudpickle into ``target`` as one kvx blob; return its sizes.

    ``target`` is only written sequentially (no seek), so it can be a local file or an
    fsspec remote file being uploaded.
    """
    header = BlobHeader.current(dataset=dataset, level=level, job=job)
    header_bytes = header.to_bytes()
    prefix = MAGIC + _U32.pack(len(header_bytes)) + header_bytes + _U32.pack(zlib.crc32(header_bytes))
    target.write(prefix)

    writer = _FrameWriter(target, level)
    try:
        try:
            _Pickler(writer, protocol=PICKLE_PROTOCOL).dump(obj)
        except (KvxError, MemoryError):
            raise
        except Exception as exc:
            if writer.sink_error is not None:
                raise  # storage failed under the pickler: the store classifies and retries it
            # Anything else raised while pickling is the object's own doing (a Spark DataFrame
            # raises RuntimeError, a lock TypeError, a custom __reduce__ anything at all).
            what = f"output '{dataset}'" if dataset else "the object"
            message = " ".join(str(exc).split())
            raise BlobUnpicklable(
                f"{what} cannot be pickled to cross to another step "
                f"({type(exc).__name__}: {message[:300] or 'no message'})",
                hint="declare it in the catalog with a dataset type that stores it, e.g. "
                "spark.SparkDataset for a Spark DataFrame, or run its producer and consumers in "
                "one step with run_config.grouping",
            ) from exc
        writer.finish()
    finally:
        writer.close()
    target.write(_TRAILER.pack(TRAILER_MAGIC, writer.stored, writer.pickled))
    return BlobInfo(
        header=header,
        stored_bytes=len(prefix) + writer.stored + _TRAILER.size,
        pickled_bytes=writer.pickled,
    )


def _read_exact(source: IO[bytes], n: int, what: str, describe: str) -> bytes:
    data = source.read(n)
    if data is None or len(data) != n:
        raise BlobCorrupt(f"{describe}: truncated ({what} incomplete)")
    return bytes(data)


def _decompress_frame(decompressor: zstandard.ZstdDecompressor, frame: tuple[bytes, int]) -> bytes:
    stored, raw_length = frame
    return decompressor.decompress(stored, max_output_size=raw_length)


def _decompress_frame_into(
    decompressor: zstandard.ZstdDecompressor, frame: tuple[bytes, memoryview]
) -> int:
    stored, target = frame
    reader = decompressor.stream_reader(stored)
    filled = reader.readinto(target)
    if reader.read(1):  # the frame holds more than its length prefix says
        raise zstandard.ZstdError("frame longer than recorded")
    return int(filled)


class _FrameReader(io.RawIOBase):
    """Feeds the unpickler from the frames of a blob body, decompressed ahead on a thread pool.

    Frames are read from ``source`` in order on the calling thread (storage handles are not
    thread-safe) and decompressed by the pool. When the unpickler asks for a large buffer (a
    protocol-5 array), the frames that fall wholly inside it are decompressed straight into it,
    sparing a copy. Every zstd or framing error becomes a :class:`BlobCorrupt` naming the blob.
    """

    def __init__(self, source: IO[bytes], describe: str) -> None:
        self._source = source
        self._describe = describe
        self._frames = _FramePipeline(zstandard.ZstdDecompressor)
        self._current = memoryview(b"")
        self._ended = False
        self.count = 0
        self.stored = 0

    def readable(self) -> bool:
        return True

    def _corrupt(self, what: str) -> BlobCorrupt:
        return BlobCorrupt(f"{self._describe}: {what}")

    def _read_ahead(self, target: memoryview | None, filled: int) -> None:
        """Submit frames until the window is full; those that fit in ``target`` go there."""
        claimed = filled + self._current.nbytes + self._frames.pending_raw
        while not self._ended and len(self._frames) < self._frames.window:
            prefix = _read_exact(self._source, _FRAME_PREFIX.size, "frame length", self._describe)
            stored_length, raw_length = _FRAME_PREFIX.unpack(prefix)
            self.stored += _FRAME_PREFIX.size + stored_length
            if stored_length == 0:
                self._ended = True
                if raw_length:
                    raise self._corrupt("damaged end-of-frames marker")
                return
            if stored_length > _MAX_STORED_FRAME or not 0 < raw_length <= FRAME_SIZE:
                raise self._corrupt(f"damaged frame header ({stored_length}/{raw_length} bytes)")
            stored = _read_exact(self._source, stored_length, "frame", self._describe)
            if target is not None and claimed + raw_length <= target.nbytes:
                into = target[claimed : claimed + raw_length]
                self._frames.submit(_decompress_frame_into, (stored, into), raw_length)
            else:
                self._frames.submit(_decompress_frame, (stored, raw_length), raw_length)
            claimed += raw_length

    def _next_result(self) -> Any:
        try:
            result, raw_length = self._frames.next_result()
        except zstandard.ZstdError as exc:
            raise self._corrupt(f"compressed data is corrupt ({exc})") from None
        got = result if isinstance(result, int) else len(result)
        if got != raw_length:
            raise self._corrupt(f"a frame decompressed to {got} bytes, not {raw_length}")
        return result

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        filled = 0
        while filled < view.nbytes:
            if self._current.nbytes:
                n = min(view.nbytes - filled, self._current.nbytes)
                view[filled : filled + n] = self._current[:n]
                self._current = self._current[n:]
                filled += n
                continue
            self._read_ahead(view, filled)
            if not len(self._frames):
                break
            result = self._next_result()
            if isinstance(result, int):  # decompressed in place, at ``filled``
                filled += result
            else:
                self._current = memoryview(result)
        # Frames decompressed in place are all done (they lie below ``filled``); keep the
        # pool busy for the next call.
        self._read_ahead(None, 0)
        self.count += filled
        return filled

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            chunks = []
            while chunk := self.read(_COPY_CHUNK):
                chunks.append(chunk)
            return b"".join(chunks)
        if self._current.nbytes >= size:  # the common case: one copy, straight from the frame
            data = bytes(self._current[:size])
            self._current = self._current[size:]
            self.count += size
            return data
        out = bytearray(size)
        n = self.readinto(out)
        del out[n:]
        return bytes(out)

    def readline(self, size: int | None = -1) -> bytes:
        # Only text-mode pickle opcodes (never emitted at protocol 5) use readline.
        out = bytearray()
        while (size is None or size < 0 or len(out) < size) and (byte := self.read(1)):
            out += byte
            if byte == b"\n":
                break
        return bytes(out)

    def close(self) -> None:
        self._frames.close()
        super().close()


def read_header(source: IO[bytes], describe: str) -> tuple[BlobHeader, int]:
    """Read and check the header at the start of ``source``; return it and its total length."""
    magic = source.read(len(MAGIC))
    if not magic:
        raise BlobCorrupt(f"{describe}: empty object, not a kvx blob")
    if magic != MAGIC:
        raise BlobCorrupt(
            f"{describe}: not a kvx-runtime blob (bad magic bytes; written by another tool?)"
        )
    (length,) = _U32.unpack(_read_exact(source, _U32.size, "header length", describe))
    if length > _MAX_HEADER:
        raise BlobCorrupt(f"{describe}: header length {length} is implausible")
    header_bytes = _read_exact(source, length, "header", describe)
    (crc,) = _U32.unpack(_read_exact(source, _U32.size, "header checksum", describe))
    if zlib.crc32(header_bytes) != crc:
        raise BlobCorrupt(f"{describe}: header checksum mismatch")
    try:
        fields = json.loads(header_bytes)
    except ValueError as exc:
        raise BlobCorrupt(f"{describe}: unreadable header ({exc})") from None
    if not isinstance(fields, dict):
        raise BlobCorrupt(f"{describe}: unreadable header (not a JSON object)")
    # The version decides what the other fields mean, so it is checked on its own first.
    _check_format(fields.get("format"), describe)
    try:
        header = BlobHeader(**fields)
    except TypeError as exc:
        raise BlobCorrupt(f"{describe}: unreadable header ({exc})") from None
    _check_compatible(header, describe)
    return header, len(MAGIC) + _U32.size + length + _U32.size


def _check_identity(header: BlobHeader, dataset: str | None, job: str | None, describe: str) -> None:
    wrong = []
    if dataset is not None and header.dataset is not None and header.dataset != dataset:
        wrong.append(f"dataset '{header.dataset}'")
    if job is not None and header.job is not None and header.job != job:
        wrong.append(f"job '{header.job}'")
    if wrong:
        mismatch = BlobMismatch(
            f"{describe}: holds {' of '.join(wrong)}, not what this step reads (copied or renamed by "
            "hand, or another run's job directory?)"
        )
        if job is not None and header.job != job:
            mismatch.found_job = header.job
        raise mismatch


def _check_format(version: Any, describe: str) -> None:
    if version != FORMAT_VERSION:
        raise BlobIncompatible(
            f"{describe}: blob format version {version} is not supported by this "
            f"kvx-runtime (it reads version {FORMAT_VERSION}); use the same kvx-runtime version "
            "in every step of a pipeline"
        )


def _check_compatible(header: BlobHeader, describe: str) -> None:
    if header.codec != "zstd":
        raise BlobIncompatible(f"{describe}: unknown codec {header.codec!r}")
    if header.pickle_protocol > pickle.HIGHEST_PROTOCOL:
        raise BlobIncompatible(
            f"{describe}: written with pickle protocol {header.pickle_protocol}, this Python "
            f"reads up to {pickle.HIGHEST_PROTOCOL}"
        )
    writer_minor = ".".join(header.python.split(".")[:2])
    reader_minor = ".".join(map(str, sys.version_info[:2]))
    if writer_minor != reader_minor:
        # cloudpickle serialises code objects, which differ between Python minor versions.
        raise BlobIncompatible(
            f"{describe}: written by Python {header.python}, read by Python "
            f"{'.'.join(map(str, sys.version_info[:3]))}; cloudpickle needs the same Python "
            "minor version in every step (use one image for the whole pipeline)"
        )


def read_blob(
    source: BinaryIO,
    size: int,
    *,
    describe: str,
    dataset: str | None = None,
    job: str | None = None,
) -> tuple[Any, BlobInfo]:
    """Load the object stored in a blob of ``size`` bytes that ``source`` is positioned at.

    ``source`` must support ``seek`` (local files and fsspec files do): the trailer is checked
    first so that a truncated blob fails before anything is unpickled. With ``dataset`` (and
    ``job``), a blob that records another dataset (or job) is refused before unpickling.
    """
    header, header_length = read_header(source, describe)
    _check_identity(header, dataset, job, describe)
    body_length = size - header_length - _TRAILER.size
    if body_length <= 0:
        raise BlobCorrupt(f"{describe}: truncated ({size} bytes, no body)")
    source.seek(size - _TRAILER.size)
    magic, recorded_body, recorded_pickled = _TRAILER.unpack(
        _read_exact(source, _TRAILER.size, "trailer", describe)
    )
    if magic != TRAILER_MAGIC or recorded_body != body_length:
        raise BlobCorrupt(
            f"{describe}: truncated or damaged (the end marker does not match a "
            f"{size}-byte blob; the writing step may have died mid-upload)"
        )
    source.seek(header_length)

    failure: Exception | None = None
    with _FrameReader(source, describe) as feed:
        try:
            obj = pickle.load(feed)  # cloudpickle output is plain pickle
        except InputDataError:
            raise
        except (ModuleNotFoundError, AttributeError) as exc:
            raise BlobIncompatible(
                f"{describe}: the object needs code this image does not have ({exc}); "
                "every step must run the same image"
            ) from None
        except Exception as exc:  # damaged bytes, or intact ones the object's own code refuses here
            failure = exc
        # Read to the end-of-frames marker: every frame is checked, and nothing may follow.
        while feed.read(_COPY_CHUNK):
            pass
    if feed.count != recorded_pickled or feed.stored != body_length:
        raise BlobCorrupt(
            f"{describe}: decompressed {feed.count} of {recorded_pickled} pickled bytes from "
            f"{feed.stored} of {body_length} stored bytes"
        )
    if failure is not None:
        # Every frame checked: the bytes are what the writing step stored.
        raise BlobIncompatible(
            f"{describe}: the stored bytes are intact, but the object cannot be rebuilt here "
            f"({type(failure).__name__}: {str(failure)[:200]}): its code or a library's version differs "
            "from the writing step's; every step must run the same image"
        ) from None
    return obj, BlobInfo(header=header, stored_bytes=size, pickled_bytes=feed.count)
