"""The intermediate blob format: a checked header, a zstd cloudpickle stream, a trailer.

Layout (all integers little-endian)::

    magic            8 bytes   b"\\x89KVXBLB\\n"
    header length    4 bytes   uint32
    header           n bytes   UTF-8 JSON (format, codec, pickle protocol, versions, dataset)
    header crc32     4 bytes   uint32, of the header bytes
    body             ...       codec stream of the cloudpickle bytes
    trailer         24 bytes   b"KVXEND01" + uint64 body length + uint64 pickle length

The zstd frame carries its own content checksum, so a flipped bit in the body is detected when
the last byte is decompressed; the trailer's lengths detect truncation before any unpickling
starts; the header says which Python and cloudpickle wrote the blob, so an incompatible reader
fails with a clear message instead of an unpickling traceback.

Both directions stream: the pickler writes into the compressor, which writes into the target,
and the unpickler reads through the decompressor, so memory stays close to the object's size.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import struct
import sys
import zlib
from dataclasses import dataclass
from typing import IO, Any, BinaryIO

import cloudpickle
import zstandard

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
FORMAT_VERSION = 1
_U32 = struct.Struct("<I")
_TRAILER = struct.Struct("<8sQQ")
_MAX_HEADER = 64 * 1024
#: Pickle protocol 5 lets large buffers (numpy, pandas) go to the stream without copies.
PICKLE_PROTOCOL = 5
#: zstd level 1: on DataFrames and arrays it stores within 1% of level 3's size in half the
#: time (bench/); KVX_BLOB_LEVEL overrides it (1-19).
DEFAULT_LEVEL = 1
_COPY_CHUNK = 1 << 20


class BlobCorrupt(InputDataError):
    """The blob is truncated, corrupt, or not a kvx blob at all."""


class BlobIncompatible(InputDataError):
    """The blob is intact but was written by an incompatible format, codec or Python."""


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

    @classmethod
    def current(cls, *, dataset: str | None, level: int) -> BlobHeader:
        return cls(
            format=FORMAT_VERSION,
            codec="zstd",
            level=level,
            pickle_protocol=PICKLE_PROTOCOL,
            python=".".join(map(str, sys.version_info[:3])),
            cloudpickle=cloudpickle.__version__,
            dataset=dataset,
        )

    def to_bytes(self) -> bytes:
        return json.dumps(self.__dict__, sort_keys=True, separators=(",", ":")).encode()


@dataclass(frozen=True)
class BlobInfo:
    """Sizes of a blob written or read: ``stored`` bytes on storage, ``pickled`` bytes raw."""

    header: BlobHeader
    stored_bytes: int
    pickled_bytes: int


class _CountingWriter(io.RawIOBase):
    """Counts the bytes passing through on their way to ``target``."""

    def __init__(self, target: Any) -> None:
        self._target = target
        self.count = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = memoryview(data)
        self._target.write(view)
        self.count += view.nbytes
        return view.nbytes


#: zstd job size for multi-threaded compression. zstd's default for level 3 buffers about
#: 35 MB per worker; 2 MiB jobs keep the extra memory of a save near 10 MB per worker at the
#: same speed (measured in bench/).
_JOB_SIZE = 2 * 1024 * 1024
_MAX_THREADS = 8


def _threads() -> int:
    # zstd's worker threads (0 would mean single-threaded, in-line compression).
    return max(1, min(os.cpu_count() or 1, _MAX_THREADS))


def write_blob(
    obj: Any, target: IO[bytes], *, dataset: str | None = None, level: int = DEFAULT_LEVEL
) -> BlobInfo:
    """Pickle ``obj`` with cloudpickle into ``target`` as one kvx blob; return its sizes.

    ``target`` is only written sequentially (no seek), so it can be a local file or an
    fsspec remote file being uploaded.
    """
    header = BlobHeader.current(dataset=dataset, level=level)
    header_bytes = header.to_bytes()
    prefix = MAGIC + _U32.pack(len(header_bytes)) + header_bytes + _U32.pack(zlib.crc32(header_bytes))
    target.write(prefix)

    body = _CountingWriter(target)
    parameters = zstandard.ZstdCompressionParameters.from_level(
        level, threads=_threads(), job_size=_JOB_SIZE, write_checksum=1
    )
    compressor = zstandard.ZstdCompressor(compression_params=parameters)
    with compressor.stream_writer(body, closefd=False) as zwriter:
        sink = _CountingWriter(zwriter)
        try:
            cloudpickle.dump(obj, sink, protocol=PICKLE_PROTOCOL)  # type: ignore[arg-type]
        except (pickle.PicklingError, TypeError, AttributeError, RecursionError) as exc:
            what = f"dataset '{dataset}'" if dataset else "the object"
            raise BlobUnpicklable(
                f"{what} cannot be pickled ({type(exc).__name__}: {exc})",
                hint="declare it in the catalog with a dataset type that can store it",
            ) from exc
        zwriter.flush(zstandard.FLUSH_FRAME)
    target.write(_TRAILER.pack(TRAILER_MAGIC, body.count, sink.count))
    return BlobInfo(
        header=header,
        stored_bytes=len(prefix) + body.count + _TRAILER.size,
        pickled_bytes=sink.count,
    )


class _BoundedReader(io.RawIOBase):
    """Exposes exactly ``length`` bytes of ``source`` from its current position."""

    def __init__(self, source: IO[bytes], length: int) -> None:
        self._source = source
        self._left = length

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self._left <= 0:
            return 0
        view = memoryview(buffer).cast("B")
        want = min(len(view), self._left)
        data = self._source.read(want)
        if not data:
            return 0
        n = len(data)
        view[:n] = data
        self._left -= n
        return n


class _UnpickleSource(io.RawIOBase):
    """Feeds the unpickler from the decompressor; counts bytes; turns zstd errors into ours."""

    def __init__(self, reader: Any, describe: str) -> None:
        self._reader = reader
        self._describe = describe
        self.count = 0

    def readable(self) -> bool:
        return True

    def _call(self, method: Any, arg: Any) -> Any:
        try:
            return method(arg)
        except zstandard.ZstdError as exc:
            raise BlobCorrupt(f"{self._describe}: compressed data is corrupt ({exc})") from None

    def readinto(self, buffer: Any) -> int:
        # Large numpy/pandas buffers (pickle protocol 5) arrive here: no intermediate copy.
        n = int(self._call(self._reader.readinto, buffer))
        self.count += n
        return n

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            chunks = []
            while chunk := self.read(_COPY_CHUNK):
                chunks.append(chunk)
            return b"".join(chunks)
        chunks, left = [], size
        while left > 0:
            chunk = self._call(self._reader.read, left)
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        self.count += len(data)
        return data

    def readline(self, size: int | None = -1) -> bytes:
        # Only text-mode pickle opcodes (never emitted at protocol 5) use readline.
        out = bytearray()
        while (size is None or size < 0 or len(out) < size) and (byte := self.read(1)):
            out += byte
            if byte == b"\n":
                break
        return bytes(out)


def _read_exact(source: IO[bytes], n: int, what: str, describe: str) -> bytes:
    data = source.read(n)
    if data is None or len(data) != n:
        raise BlobCorrupt(f"{describe}: truncated ({what} incomplete)")
    return bytes(data)


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
        header = BlobHeader(**fields)
    except (ValueError, TypeError) as exc:
        raise BlobCorrupt(f"{describe}: unreadable header ({exc})") from None
    _check_compatible(header, describe)
    return header, len(MAGIC) + _U32.size + length + _U32.size


def _check_compatible(header: BlobHeader, describe: str) -> None:
    if header.format != FORMAT_VERSION:
        raise BlobIncompatible(
            f"{describe}: blob format version {header.format} is not supported by this "
            f"kvx-runtime (it reads version {FORMAT_VERSION}); use the same kvx-runtime version "
            "in every step of a pipeline"
        )
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


def read_blob(source: BinaryIO, size: int, *, describe: str) -> tuple[Any, BlobInfo]:
    """Load the object stored in a blob of ``size`` bytes that ``source`` is positioned at.

    ``source`` must support ``seek`` (local files and fsspec files do): the trailer is checked
    first so that a truncated blob fails before anything is unpickled.
    """
    header, header_length = read_header(source, describe)
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

    bounded = _BoundedReader(source, body_length)
    decompressor = zstandard.ZstdDecompressor()
    with decompressor.stream_reader(bounded, closefd=False, read_across_frames=False) as zreader:
        feed = _UnpickleSource(zreader, describe)
        try:
            obj = pickle.load(feed)  # cloudpickle output is plain pickle
        except InputDataError:
            raise
        except (pickle.UnpicklingError, EOFError, ValueError) as exc:
            raise BlobCorrupt(f"{describe}: pickle stream is damaged ({exc})") from None
        except (ModuleNotFoundError, AttributeError) as exc:
            raise BlobIncompatible(
                f"{describe}: the object needs code this image does not have ({exc}); "
                "every step must run the same image"
            ) from None
        # Drain to the end of the frame so zstd verifies its content checksum.
        while feed.read(_COPY_CHUNK):
            pass
    if feed.count != recorded_pickled:
        raise BlobCorrupt(
            f"{describe}: decompressed {feed.count} bytes, the writer recorded {recorded_pickled}"
        )
    return obj, BlobInfo(header=header, stored_bytes=size, pickled_bytes=feed.count)
