"""GGUF reader that works on a byte prefix.

The browser has only the first megabytes of a model when it must decide how to lay the tensors out
on the GPU, so the parser takes whatever prefix it is given and, when that is too short, raises
`GGUFNeedMoreData` saying how many bytes it needs. Hand-written (not `gguf.GGUFReader`) because that
reader memory-maps a whole file, which Pyodide cannot do and a streamed download does not have.

The file is untrusted input, so the parser is written as one: every problem raises `GGUFError` (or
its subclass `GGUFNeedMoreData`) whose message names the field, and its time and memory grow with
the bytes it actually reads, never with a size the file claims. Concretely:
- nothing in the header may end past `MAX_HEADER_BYTES` or the end of the file;
- a count or length is checked against the bytes left before anything is allocated or looped over;
- no recursion: arrays of arrays are rejected, as llama.cpp's reader does;
- tensor data must be laid out exactly as llama.cpp requires: in table order from the start of the
  data section, each tensor padded to `general.alignment`, which must be a power-of-two integer.
  This rules out overlapping, misaligned and out-of-bounds tensors in one check.
What the metadata *means* (types and ranges of hyper-parameters) is checked by the layer that reads
it: `models/hparams.py` for architectures, `tokenizer.py` for the vocabulary.
"""

from __future__ import annotations

import bisect
import dataclasses
import re
import struct
from collections.abc import Sequence
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
MAX_HEADER_BYTES = 64 << 20  # header + metadata + tensor table; gemma-3's 262k-token vocab takes 6.5 MB
MAX_TENSOR_NAME = 63  # bytes; GGML_MAX_NAME (64) counts the terminating NUL
MAX_KEY = 1 << 10  # bytes of a metadata key ("tokenizer.ggml.add_space_prefix" is 31)
MAX_STRING = 1 << 24  # bytes of a metadata string (a chat template is a few KB)
MAX_DIM = 1 << 40  # elements along one tensor dimension
MAX_ELEMENTS = 1 << 44  # elements in one tensor


class GGUFError(BadModel):
    """A GGUF file is malformed or unsupported; the message names the problem."""


class GGUFNeedMoreData(GGUFError):
    """The prefix ends before the header does; `needed` is the prefix length that would be enough."""

    def __init__(self, needed: int) -> None:
        super().__init__(f"GGUF header needs at least {needed} bytes")
        self.needed = needed


_U32, _U64 = struct.Struct("<I"), struct.Struct("<Q")
_STRING, _ARRAY = 8, 9
# metadata value type id -> (struct for one value, numpy dtype for an array of them)
_NUMBERS: dict[int, tuple[struct.Struct, np.dtype]] = {
    type_id: (struct.Struct("<" + fmt), np.dtype("<" + fmt)) for type_id, fmt in {
        0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}.items()}
_BOOL = 7


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dims: tuple[int, ...]  # GGUF order: dims[0] is the fastest-varying (row length)
    type_id: int
    offset: int  # absolute byte offset in the file
    nbytes: int
    view_of: tuple[str, int] | None = None  # a row view's file tensor and first row (models.hparams.row_view)

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
    metadata: dict[str, Any]  # ints, floats, bools, strs; arrays as numpy arrays or lists of str
    tensors: dict[str, TensorInfo]
    data_offset: int  # where tensor data begins
    alignment: int

    @property
    def architecture(self) -> str:
        arch = self.metadata.get("general.architecture")
        if not isinstance(arch, str):
            raise GGUFError(f"metadata has no general.architecture string (got {arch!r:.40})")
        return arch

    @property
    def data_size(self) -> int:
        return max((t.offset + t.nbytes for t in self.tensors.values()), default=self.data_offset)


class _Cursor:
    """Reads little-endian values from a prefix; running off its end asks for more data."""

    def __init__(self, buf: memoryview, file_size: int | None) -> None:
        self.buf, self.pos, self.file_size = buf, 0, file_size
        # no header field may end past this: the file's end or the header limit, whichever is first
        self.limit = MAX_HEADER_BYTES if file_size is None else min(file_size, MAX_HEADER_BYTES)

    def need(self, n: int, what: str) -> None:
        end = self.pos + n
        if end > self.limit:
            if self.file_size is not None and end > self.file_size:
                raise GGUFError(f"truncated GGUF: {what} at byte {self.pos} runs past the end of the file "
                                f"({self.file_size} bytes)")
            raise GGUFError(f"{what} at byte {self.pos} ends past byte {MAX_HEADER_BYTES}: no GGUF header "
                            f"is that large ({MAX_HEADER_BYTES >> 20} MiB at most)")
        if end > len(self.buf):
            # ask for a generous prefix so a streamed reader does not come back byte by byte
            raise GGUFNeedMoreData(min(max(end, 2 * len(self.buf)), self.limit))

    def scalar(self, fmt: struct.Struct, what: str) -> Any:
        self.need(fmt.size, what)
        (value,) = fmt.unpack_from(self.buf, self.pos)
        self.pos += fmt.size
        return value

    def count(self, what: str, item_bytes: int) -> int:
        """A u64 count of items that take at least `item_bytes` each: they must fit the bytes left."""
        n = self.scalar(_U64, what)
        room = self.limit - self.pos
        if n * item_bytes > room:
            bound = ("of the file" if self.limit == self.file_size
                     else f"before the {MAX_HEADER_BYTES >> 20} MiB header limit")
            raise GGUFError(f"absurd {what}: {n} (at least {item_bytes} bytes each, but only {room} bytes "
                            f"{bound} remain): truncated or corrupt GGUF")
        return n

    def string(self, what: str, max_bytes: int = MAX_STRING) -> str:
        n = self.scalar(_U64, f"length of {what}")
        if n > max_bytes:
            raise GGUFError(f"absurd length of {what}: {n} bytes (at most {max_bytes})")
        self.need(n, what)
        text = self._utf8(self.pos, n, what)
        self.pos += n
        return text

    def _utf8(self, start: int, n: int, what: str) -> str:
        try:
            return str(self.buf[start:start + n], "utf-8")
        except UnicodeDecodeError:
            raise GGUFError(f"{what} is not valid UTF-8") from None

    def strings(self, n: int, what: str) -> list[str]:
        """`n` strings in a row. A vocab holds hundreds of thousands, so this is `string` in one tight
        loop; a string the fast path cannot take (cut off, too long, not UTF-8) goes through `string`
        itself, which reads it or raises the precise error."""
        buf, pos, out = self.buf, self.pos, []
        fits = min(len(buf), self.limit)
        unpack = _U64.unpack_from
        for i in range(n):
            if pos + 8 <= fits:
                size = unpack(buf, pos)[0]
                if size <= MAX_STRING and pos + 8 + size <= fits:
                    try:
                        out.append(str(buf[pos + 8:pos + 8 + size], "utf-8"))
                        pos += 8 + size
                        continue
                    except UnicodeDecodeError:
                        pass
            self.pos = pos
            out.append(self.string(f"{what}[{i}]"))
            pos = self.pos
        self.pos = pos
        return out

    def value(self, vtype: int, what: str) -> Any:
        if vtype in _NUMBERS:
            return self.scalar(_NUMBERS[vtype][0], what)
        if vtype == _STRING:
            return self.string(what)
        if vtype == _ARRAY:
            return self.array(what)
        raise GGUFError(f"{what}: unknown metadata value type {vtype}")

    def array(self, what: str) -> np.ndarray | list[str]:
        etype = self.scalar(_U32, f"element type of {what}")
        if etype == _STRING:
            return self.strings(self.count(f"length of {what}", 8), what)
        if etype in _NUMBERS:
            dtype = _NUMBERS[etype][1]
            n = self.count(f"length of {what}", dtype.itemsize)
            self.need(n * dtype.itemsize, what)
            arr = np.frombuffer(self.buf, dtype=dtype, count=n, offset=self.pos)
            self.pos += n * dtype.itemsize
            # a bool byte other than 0/1 is still true; normalise so no odd numpy bools escape
            return arr.view(np.uint8) != 0 if etype == _BOOL else arr.copy()
        if etype == _ARRAY:
            raise GGUFError(f"{what} is an array of arrays, which GGUF readers (llama.cpp's too) do not support")
        raise GGUFError(f"{what}: unknown array element type {etype}")


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
    version = cur.scalar(_U32, "version")
    if version not in SUPPORTED_VERSIONS:
        raise GGUFError(f"unsupported GGUF version {version} (supported: {SUPPORTED_VERSIONS})")
    # smallest entries: a tensor is name length, n_dims, one dim, type, offset; a key/value pair is
    # key length, value type and a one-byte value
    n_tensors = cur.count("tensor count", 8 + 4 + 8 + 4 + 8)
    n_kv = cur.count("metadata count", 8 + 4 + 1)

    metadata: dict[str, Any] = {}
    for i in range(n_kv):
        key = cur.string(f"metadata key #{i}", MAX_KEY)
        if key in metadata:
            raise GGUFError(f"duplicate metadata key {key!r}")
        metadata[key] = cur.value(cur.scalar(_U32, f"type of {key}"), key)
    alignment = _alignment(metadata)

    table = []
    for i in range(n_tensors):
        name = cur.string(f"name of tensor #{i}", MAX_TENSOR_NAME)
        n_dims = cur.scalar(_U32, f"dimension count of tensor {name!r}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise GGUFError(f"tensor {name!r} has {n_dims} dimensions (1..{MAX_DIMS} allowed)")
        dims = tuple(cur.scalar(_U64, f"dimension {k} of tensor {name!r}") for k in range(n_dims))
        type_id = cur.scalar(_U32, f"type of tensor {name!r}")
        offset = cur.scalar(_U64, f"offset of tensor {name!r}")
        table.append((name, dims, type_id, offset))

    data_offset = -(-cur.pos // alignment) * alignment
    tensors: dict[str, TensorInfo] = {}
    expected = 0  # where the next tensor must start, relative to the data section
    for name, dims, type_id, offset in table:
        if name in tensors:
            raise GGUFError(f"duplicate tensor name {name!r}")
        nbytes = _tensor_bytes(name, dims, type_id)
        if offset != expected:
            why = (f"is not a multiple of general.alignment {alignment}" if offset % alignment else
                   "overlaps the tensor before it" if offset < expected else "leaves a gap before it")
            raise GGUFError(f"tensor {name!r}: data offset {offset} {why}; tensors must follow each other in "
                            f"table order, each padded to {alignment} bytes, so it must be {expected}")
        start = data_offset + offset
        if file_size is not None and start + nbytes > file_size:
            raise GGUFError(f"tensor {name!r} (bytes {start}..{start + nbytes}) runs past the end of the "
                            f"file ({file_size} bytes): truncated or corrupt GGUF")
        tensors[name] = TensorInfo(name, dims, type_id, start, nbytes)
        expected += -(-nbytes // alignment) * alignment
    return GGUFHeader(version, metadata, tensors, data_offset, alignment)


def _alignment(metadata: dict[str, Any]) -> int:
    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    # bool is an int subclass in Python: without the first test `true` would pass as 1
    if isinstance(alignment, bool) or not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise GGUFError(f"general.alignment must be a power-of-two integer, got {alignment!r:.40}")
    return alignment


def _tensor_bytes(name: str, dims: tuple[int, ...], type_id: int) -> int:
    """Size of a tensor's data, after checking its type and shape are ones GGML can hold."""
    try:
        qt = quant_type(type_id)
    except UnknownQuantType as e:
        raise GGUFError(f"tensor {name!r}: {e}") from None
    n = 1
    for d in dims:
        if not 1 <= d <= MAX_DIM:
            raise GGUFError(f"tensor {name!r} has an absurd dimension {d} in {dims}")
        n *= d
    if n > MAX_ELEMENTS:
        raise GGUFError(f"tensor {name!r} has an absurd element count {n} ({dims})")
    if dims[0] % qt.block_size:
        raise GGUFError(f"tensor {name!r}: row length {dims[0]} is not a multiple of "
                        f"{qt.name}'s block size {qt.block_size}")
    return n // qt.block_size * qt.type_size


SPLIT_NAME = re.compile(r"^(?P<prefix>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")


def model_name(path: Path) -> str:
    """What a GGUF file's model is called: its file name without .gguf, or a split model's NAME."""
    m = SPLIT_NAME.match(path.name)
    return m["prefix"] if m else path.name.removesuffix(".gguf")


def shard_names(first: str, count: int) -> list[str]:
    """The file names of a split model as llama.cpp's gguf-split writes them, NAME-00001-of-0000N.gguf
    first, from the first shard's name and its split.count."""
    m = SPLIT_NAME.match(first)
    if not m or int(m["no"]) != 1 or int(m["count"]) != count:
        raise GGUFError(f"{first} is shard 1 of a {count}-file split model, but is not named "
                        f"NAME-00001-of-{count:05d}.gguf")
    return [f"{m['prefix']}-{i:05d}-of-{count:05d}.gguf" for i in range(1, count + 1)]


def shard_paths(first: Path, count: int) -> list[Path]:
    return [first.with_name(name) for name in shard_names(first.name, count)]


def model_files(path: Path) -> list[Path]:
    """A model's files as their names say: the one, or a split model's shards from its first shard."""
    m = SPLIT_NAME.match(path.name)
    return shard_paths(path, int(m["count"])) if m and int(m["no"]) == 1 else [path]


def split_count(header: GGUFHeader, name: str) -> int:
    """How many files the model whose first file is `header` spans (1: not split); a later shard
    given as the first is refused."""
    count = header.metadata.get("split.count", 1)
    if not isinstance(count, int) or count <= 1:
        return 1
    if header.metadata.get("split.no", 0) != 0:
        raise GGUFError(f"{name} is shard {header.metadata['split.no'] + 1} of a split model: "
                        "open its first shard (-00001-of-...)")
    return count


def add_shard(tensors: dict[str, TensorInfo], header: GGUFHeader, i: int, count: int, name: str,
              base: int) -> None:
    """Add shard i's tensors to a split model's `tensors`, their offsets counted from the start of
    the first shard (`base`: the bytes of the shards before this one)."""
    if header.metadata.get("split.no") != i or header.metadata.get("split.count") != count:
        raise GGUFError(f"{name} is not shard {i + 1} of {count} (its split.no / split.count)")
    for tensor_name, t in header.tensors.items():
        if tensor_name in tensors:
            raise GGUFError(f"split model: tensor {tensor_name!r} is in two shards")
        tensors[tensor_name] = dataclasses.replace(t, offset=base + t.offset)


def joined_header(first: GGUFHeader, tensors: dict[str, TensorInfo], name: str) -> GGUFHeader:
    """A split model as one header: the first shard's metadata, every shard's tensors."""
    want = first.metadata.get("split.tensors.count", len(tensors))
    if want != len(tensors):
        raise GGUFError(f"split model {name}: its shards hold {len(tensors)} tensors, split.tensors.count "
                        f"says {want}")
    return dataclasses.replace(first, tensors=tensors)


@dataclass(frozen=True)
class GGUFFile:
    """A GGUF model on disk: the parsed header plus zero-copy access to tensor bytes. A split model
    (gguf-split's shards) is one header whose tensors' offsets run on across the shards: shard i's
    bytes start at `bases[i]`, the sum of the sizes of the shards before it."""

    path: Path
    header: GGUFHeader
    data: np.ndarray  # the (first) file, memory-mapped uint8
    shards: tuple[np.ndarray, ...] = ()  # every shard's bytes, memory-mapped (empty: one file, `data`)
    bases: tuple[int, ...] = ()

    @property
    def metadata(self) -> dict[str, Any]:
        return self.header.metadata

    @property
    def tensors(self) -> dict[str, TensorInfo]:
        return self.header.tensors

    def tensor_bytes(self, tensor: TensorInfo | str) -> np.ndarray:
        t = self.tensors[tensor] if isinstance(tensor, str) else tensor
        if not self.shards:
            return self.data[t.offset:t.offset + t.nbytes]
        return shard_slice(self.shards, self.bases, t)


def shard_slice(shards: Sequence[np.ndarray], bases: Sequence[int], t: TensorInfo) -> np.ndarray:
    """A tensor's bytes in a split model: its offset counts across the shards, shard i's from bases[i]."""
    i = bisect.bisect_right(bases, t.offset) - 1
    at = t.offset - bases[i]
    return shards[i][at:at + t.nbytes]


def _read_one(path: Path) -> tuple[GGUFHeader, np.ndarray]:
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            want = min(size, 8 << 20)
            while True:
                f.seek(0)
                prefix = f.read(want)
                if len(prefix) < want:  # the file shrank since stat(): do not ask for the same bytes forever
                    raise GGUFError(f"model file {path} changed while it was read")
                try:
                    header = parse_header(prefix, file_size=size)
                    break
                except GGUFNeedMoreData as e:
                    want = e.needed
        data = np.memmap(path, dtype=np.uint8, mode="r") if size else np.zeros(0, np.uint8)
    except OSError as e:
        raise GGUFError(f"cannot read model file {path}: {e.strerror or e}") from None
    return header, data


def read_gguf(path: str | Path) -> GGUFFile:
    """Open a GGUF file: parse its header, map its tensor data. The first shard of a split model
    (`split.count` > 1) opens every shard, which must lie beside it."""
    path = Path(path)
    header, data = _read_one(path)
    count = split_count(header, path.name)
    if count == 1:
        return GGUFFile(path, header, data)
    tensors, shards, bases, base = {}, [], [], 0
    for i, shard in enumerate(shard_paths(path, count)):
        if not shard.exists():
            raise GGUFError(f"split model {path.name}: shard {i + 1} of {count} is missing ({shard})")
        h, d = (header, data) if i == 0 else _read_one(shard)
        add_shard(tensors, h, i, count, shard.name, base)
        shards.append(d)
        bases.append(base)
        base += len(d)
    return GGUFFile(path, joined_header(header, tensors, path.name), data, tuple(shards), tuple(bases))
