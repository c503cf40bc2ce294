"""GGUF reader that works on a byte prefix.

The browser has only the first megabytes of a model when it must decide how to lay the tensors out
on the GPU, so the parser takes whatever prefix it is given and, when that is too short, raises
`GGUFNeedMoreData` saying how many bytes it needs. Hand-written (not `gguf.GGUFReader`) because that
reader memory-maps a whole file, which Pyodide cannot do and a streamed download does not have.

Every problem with the file raises `GGUFError` (or its subclass `GGUFNeedMoreData`) whose message
names what is wrong; nothing here allocates more than the file claims and the prefix holds.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import BadModel
from .quants import UnknownQuantType, quant_type

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_TENSORS = 1 << 20
MAX_KV = 1 << 20
MAX_STRING = 1 << 24  # 16 MiB: no key, token or template is near this


class GGUFError(BadModel):
    """A GGUF file is malformed or unsupported; the message names the problem."""


class GGUFNeedMoreData(GGUFError):
    """The prefix ends before the header does; `needed` is the prefix length that would be enough."""

    def __init__(self, needed: int) -> None:
        super().__init__(f"GGUF header needs at least {needed} bytes")
        self.needed = needed


# value type id -> (name, struct format or None for string/array)
_SCALARS: dict[int, tuple[str, str]] = {
    0: ("uint8", "<B"), 1: ("int8", "<b"), 2: ("uint16", "<H"), 3: ("int16", "<h"),
    4: ("uint32", "<I"), 5: ("int32", "<i"), 6: ("float32", "<f"), 7: ("bool", "<?"),
    10: ("uint64", "<Q"), 11: ("int64", "<q"), 12: ("float64", "<d"),
}
_NUMPY_DTYPES = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?",
                 10: "<u8", 11: "<i8", 12: "<f8"}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dims: tuple[int, ...]  # GGUF order: dims[0] is the fastest-varying (row length)
    type_id: int
    offset: int  # absolute byte offset in the file
    nbytes: int

    @property
    def shape(self) -> tuple[int, ...]:
        """numpy order (rows, row length)."""
        return tuple(reversed(self.dims))

    @property
    def type_name(self) -> str:
        return quant_type(self.type_id).name


@dataclass(frozen=True)
class GGUFHeader:
    version: int
    metadata: dict[str, Any]
    tensors: dict[str, TensorInfo]
    data_offset: int  # where tensor data begins
    alignment: int

    @property
    def architecture(self) -> str:
        arch = self.metadata.get("general.architecture")
        if not isinstance(arch, str):
            raise GGUFError("metadata has no general.architecture")
        return arch

    @property
    def data_size(self) -> int:
        return max((t.offset + t.nbytes for t in self.tensors.values()), default=self.data_offset)


class _Cursor:
    """Reads little-endian values from a prefix; running off its end asks for more data."""

    def __init__(self, buf: memoryview, file_size: int | None) -> None:
        self.buf, self.pos, self.file_size = buf, 0, file_size

    def need(self, n: int, what: str) -> None:
        end = self.pos + n
        if self.file_size is not None and end > self.file_size:
            raise GGUFError(f"truncated GGUF: {what} at byte {self.pos} runs past the end of the file "
                            f"({self.file_size} bytes)")
        if end > len(self.buf):
            # ask for a generous prefix so a streamed reader does not come back byte by byte
            raise GGUFNeedMoreData(max(end, 2 * len(self.buf)) if self.file_size is None
                                   else min(max(end, 2 * len(self.buf)), self.file_size))

    def scalar(self, fmt: str, what: str) -> Any:
        size = struct.calcsize(fmt)
        self.need(size, what)
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return value

    def count(self, what: str, limit: int, min_item_bytes: int) -> int:
        n = self.scalar("<Q", what)
        room = (self.file_size - self.pos) if self.file_size is not None else None
        if n > limit:
            raise GGUFError(f"absurd {what}: {n}")
        if room is not None and n * min_item_bytes > room:
            raise GGUFError(f"truncated or corrupt GGUF: {what} is {n}, but only {room} bytes remain")
        return n

    def string(self, what: str) -> str:
        n = self.count(f"length of {what}", MAX_STRING, 1)
        self.need(n, what)
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise GGUFError(f"{what} is not valid UTF-8") from None

    def value(self, vtype: int, what: str) -> Any:
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype][1], what)
        if vtype == _STRING:
            return self.string(what)
        if vtype == _ARRAY:
            etype = self.scalar("<I", f"element type of {what}")
            if etype in _NUMPY_DTYPES:
                dtype = np.dtype(_NUMPY_DTYPES[etype])
                n = self.count(f"length of {what}", 1 << 40, dtype.itemsize)
                self.need(n * dtype.itemsize, what)
                arr = np.frombuffer(self.buf, dtype=dtype, count=n, offset=self.pos).copy()
                self.pos += n * dtype.itemsize
                return arr
            if etype == _STRING:
                n = self.count(f"length of {what}", 1 << 32, 8)
                return [self.string(f"{what}[{i}]") for i in range(n)]
            if etype == _ARRAY:
                n = self.count(f"length of {what}", 1 << 20, 12)
                return [self.value(_ARRAY, f"{what}[{i}]") for i in range(n)]
            raise GGUFError(f"{what}: unknown array element type {etype}")
        raise GGUFError(f"{what}: unknown metadata value type {vtype}")


def parse_header(prefix: bytes | bytearray | memoryview, file_size: int | None = None) -> GGUFHeader:
    """Parse header, metadata and tensor table from the first bytes of a GGUF file.

    `file_size` (when known) lets the parser reject offsets past the end; without it a short prefix
    raises `GGUFNeedMoreData` rather than an error.
    """
    buf = memoryview(prefix).cast("B")
    if file_size is not None and file_size < len(buf):
        file_size = len(buf)
    cur = _Cursor(buf, file_size)
    cur.need(4, "magic")
    if bytes(buf[:4]) != GGUF_MAGIC:
        raise GGUFError(f"not a GGUF file: magic is {bytes(buf[:4])!r}, expected {GGUF_MAGIC!r}")
    cur.pos = 4
    version = cur.scalar("<I", "version")
    if version not in SUPPORTED_VERSIONS:
        raise GGUFError(f"unsupported GGUF version {version} (supported: {SUPPORTED_VERSIONS})")
    n_tensors = cur.count("tensor count", MAX_TENSORS, 24)
    n_kv = cur.count("metadata count", MAX_KV, 12)

    metadata: dict[str, Any] = {}
    for i in range(n_kv):
        key = cur.string(f"metadata key #{i}")
        if key in metadata:
            raise GGUFError(f"duplicate metadata key {key!r}")
        metadata[key] = cur.value(cur.scalar("<I", f"type of {key}"), key)

    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise GGUFError(f"general.alignment must be a power of two, got {alignment!r}")

    raw_tensors = []
    for i in range(n_tensors):
        name = cur.string(f"tensor name #{i}")
        n_dims = cur.scalar("<I", f"dimension count of {name}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise GGUFError(f"tensor {name!r} has {n_dims} dimensions (1..{MAX_DIMS} allowed)")
        dims = tuple(cur.scalar("<Q", f"dimension of {name}") for _ in range(n_dims))
        type_id = cur.scalar("<I", f"type of {name}")
        offset = cur.scalar("<Q", f"offset of {name}")
        raw_tensors.append((name, dims, type_id, offset))

    data_offset = -(-cur.pos // alignment) * alignment
    tensors: dict[str, TensorInfo] = {}
    for name, dims, type_id, offset in raw_tensors:
        if name in tensors:
            raise GGUFError(f"duplicate tensor name {name!r}")
        tensors[name] = _tensor_info(name, dims, type_id, offset, data_offset, alignment, file_size)
    return GGUFHeader(version, metadata, tensors, data_offset, alignment)


def _tensor_info(name: str, dims: tuple[int, ...], type_id: int, offset: int, data_offset: int,
                 alignment: int, file_size: int | None) -> TensorInfo:
    try:
        qt = quant_type(type_id)
    except UnknownQuantType as e:
        raise GGUFError(f"tensor {name!r}: {e}") from None
    n = 1
    for d in dims:
        if d <= 0 or d > 1 << 40:
            raise GGUFError(f"tensor {name!r} has an absurd dimension {d} in {dims}")
        n *= d
    if n > 1 << 44:
        raise GGUFError(f"tensor {name!r} has an absurd element count {n}")
    if dims[0] % qt.block_size:
        raise GGUFError(f"tensor {name!r}: row length {dims[0]} is not a multiple of "
                        f"{qt.name}'s block size {qt.block_size}")
    if offset % alignment:
        raise GGUFError(f"tensor {name!r}: offset {offset} is not aligned to {alignment}")
    nbytes = n // qt.block_size * qt.type_size
    start = data_offset + offset
    if file_size is not None and start + nbytes > file_size:
        raise GGUFError(f"tensor {name!r} (bytes {start}..{start + nbytes}) runs past the end of the "
                        f"file ({file_size} bytes): truncated or corrupt GGUF")
    return TensorInfo(name, dims, type_id, start, nbytes)


@dataclass
class GGUFFile:
    """A GGUF file on disk: the parsed header plus zero-copy access to tensor bytes."""

    path: Path
    header: GGUFHeader
    data: np.ndarray  # the whole file, memory-mapped uint8

    @property
    def metadata(self) -> dict[str, Any]:
        return self.header.metadata

    @property
    def tensors(self) -> dict[str, TensorInfo]:
        return self.header.tensors

    def tensor_bytes(self, tensor: TensorInfo | str) -> np.ndarray:
        t = self.tensors[tensor] if isinstance(tensor, str) else tensor
        return self.data[t.offset:t.offset + t.nbytes]


def read_gguf(path: str | Path) -> GGUFFile:
    """Open a GGUF file: parse its header, map its tensor data."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            want = min(size, 8 << 20)
            while True:
                f.seek(0)
                try:
                    header = parse_header(f.read(want), file_size=size)
                    break
                except GGUFNeedMoreData as e:
                    want = e.needed
        data = np.memmap(path, dtype=np.uint8, mode="r") if size else np.zeros(0, np.uint8)
    except OSError as e:
        raise GGUFError(f"cannot read model file {path}: {e.strerror or e}") from None
    return GGUFFile(path, header, data)
