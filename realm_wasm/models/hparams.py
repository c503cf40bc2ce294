"""An architecture's hyper-parameters and tensors, validated before any model code sees them.

Each model file declares a `Schema`: the `{arch}.*` keys it reads (type, inclusive range, default
when the file may leave the key out) and the tensors it needs, with shapes written in named sizes.
`HParams(header, schema)` checks the metadata against it, derives the sizes (with cross-checks such
as "head_count_kv divides head_count"), then checks that every tensor of every block exists with
its shape and that the file holds no tensor the plan would not use. So a builder only ever sees
typed, in-range values and tensors that exist, and a corrupt `block_count` of 2^32 fails at the
first block that is missing instead of building 2^32 layers. Errors are `GGUFError`s naming the key
or tensor, as llama.cpp's loader reports them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..gguf import GGUFError, GGUFHeader, TensorInfo
from ..plan import Op

# Ranges wide enough for any released model (llama-3.1-405B: 126 blocks, 16384 wide, 128 heads;
# gemma-3: 262144 tokens, head dim 256; contexts up to 10M) and small enough that nothing derived
# from them (loops, buffer sizes) can be absurd.
MAX_BLOCKS = 1 << 10
MAX_WIDTH = 1 << 20  # embedding and feed-forward widths
MAX_HEADS = 1 << 12
MAX_HEAD_DIM = 1 << 12
MAX_CONTEXT = 1 << 24


@dataclass(frozen=True)
class Key:
    """One `{arch}.<name>` metadata key: the type its value must have (int, or float: a float key also
    takes an integer), the inclusive range it must lie in, and the default used when the file leaves
    it out: a value, a function of the keys listed before it, or None when the key is required."""

    kind: type
    low: float
    high: float
    default: float | Callable[[HParams], float] | None = None


Shape = tuple[str, ...]  # a tensor's dims in GGUF order (row length first), as names of sizes


@dataclass(frozen=True)
class Schema:
    """What one architecture reads from a GGUF file."""

    keys: dict[str, Key]
    tensors: dict[str, Shape]  # required, outside the blocks
    layer_tensors: dict[str, Shape]  # required in every block i, named "blk.{i}.<name>"
    optional_tensors: dict[str, Shape]  # used when present
    sizes: Callable[[HParams], dict[str, int]]  # the named sizes of the shapes, from the validated keys


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {value!r:.40}"


class HParams:
    """A GGUF header checked against a schema: hp["block_count"] is an int in range, hp.sizes the named
    sizes, hp.tensor(name) a tensor the schema asked for, with its shape."""

    def __init__(self, header: GGUFHeader, schema: Schema) -> None:
        self.header, self.arch = header, header.architecture
        self.values: dict[str, int | float] = {}
        for key, spec in schema.keys.items():
            self.values[key] = self._read(key, spec)
        self.sizes = schema.sizes(self)
        self._check_tensors(schema)

    def name(self, key: str) -> str:
        return f"{self.arch}.{key}"

    def __getitem__(self, key: str) -> Any:
        return self.values[key]

    def _read(self, key: str, spec: Key) -> int | float:
        value = self.header.metadata.get(self.name(key))
        if value is None:
            if spec.default is None:
                raise GGUFError(f"metadata is missing {self.name(key)}")
            value = spec.default(self) if callable(spec.default) else spec.default
        # bool is an int subclass in Python: `true` must not pass as 1
        is_int = isinstance(value, int) and not isinstance(value, bool)
        if not (is_int or (spec.kind is float and isinstance(value, float))):
            kind = "an integer" if spec.kind is int else "a number"
            raise GGUFError(f"{self.name(key)} must be {kind}, got {_describe(value)}")
        if not spec.low <= value <= spec.high:  # also false for NaN
            raise GGUFError(f"{self.name(key)} = {value} is outside {spec.low:g}..{spec.high:g}")
        return spec.kind(value)

    def tensor(self, name: str) -> TensorInfo:
        t = self.header.tensors.get(name)
        if t is None:
            hint = f" ({self.name('block_count')} is {self['block_count']})" if name.startswith("blk.") else ""
            raise GGUFError(f"model has no tensor {name!r}{hint}")
        return t

    def tensors(self, *names: str) -> dict[str, TensorInfo]:
        return {n: self.tensor(n) for n in names}

    def _check_tensors(self, schema: Schema) -> None:
        """Every tensor the plan will use exists with its shape, checked block by block so a wrong
        block_count stops at the first missing block; and none is left over (as in llama.cpp)."""
        wanted = dict(schema.tensors)
        wanted.update((n, s) for n, s in schema.optional_tensors.items() if n in self.header.tensors)
        for name, shape in wanted.items():
            self._check_shape(name, shape)
        for i in range(self["block_count"]):
            for name, shape in schema.layer_tensors.items():
                self._check_shape(f"blk.{i}.{name}", shape)
        n_used = len(wanted) + self["block_count"] * len(schema.layer_tensors)
        if len(self.header.tensors) > n_used:
            layer_names = {f"blk.{i}.{n}" for i in range(self["block_count"]) for n in schema.layer_tensors}
            extra = [n for n in self.header.tensors if n not in wanted and n not in layer_names]
            raise GGUFError(f"model has {len(extra)} tensors a {self.arch} model does not use, e.g. {extra[0]!r} "
                            f"({self.name('block_count')} is {self['block_count']})")

    def _check_shape(self, name: str, shape: Shape) -> None:
        dims = self.tensor(name).dims
        expected = tuple(self.sizes[s] for s in shape)
        if dims != expected:
            spelled = ", ".join(f"{s}={self.sizes[s]}" for s in shape)
            raise GGUFError(f"tensor {name!r} has dims {dims}, expected ({spelled})")


# --- what every decoder here shares ----------------------------------------------------------------

def _per_head(hp: HParams) -> int:
    """attention.key_length's default: the embedding split evenly across the query heads."""
    d, n_heads = hp["embedding_length"], hp["attention.head_count"]
    if d % n_heads:
        raise GGUFError(f"{hp.name('embedding_length')} = {d} is not a multiple of {hp.name('attention.head_count')} "
                        f"= {n_heads}, and {hp.name('attention.key_length')} is not given")
    return d // n_heads


DECODER_KEYS: dict[str, Key] = {
    "context_length": Key(int, 1, MAX_CONTEXT),
    "embedding_length": Key(int, 1, MAX_WIDTH),
    "block_count": Key(int, 1, MAX_BLOCKS),
    "feed_forward_length": Key(int, 1, MAX_WIDTH),
    "attention.head_count": Key(int, 1, MAX_HEADS),
    "attention.head_count_kv": Key(int, 1, MAX_HEADS, default=lambda hp: hp["attention.head_count"]),
    "attention.key_length": Key(int, 2, MAX_HEAD_DIM, default=_per_head),
    "attention.value_length": Key(int, 2, MAX_HEAD_DIM, default=lambda hp: hp["attention.key_length"]),
    "attention.layer_norm_rms_epsilon": Key(float, 0.0, 1.0),
    "rope.freq_base": Key(float, 1.0, 1e12, default=10_000.0),
    "rope.scaling.factor": Key(float, 1 / 1024, 1024.0, default=1.0),
}

DECODER_TENSORS: dict[str, Shape] = {
    "token_embd.weight": ("n_embd", "n_vocab"),
    "output_norm.weight": ("n_embd",),
}
TIED_OUTPUT: dict[str, Shape] = {"output.weight": ("n_embd", "n_vocab")}  # absent: token_embd is the head
DECODER_LAYER_TENSORS: dict[str, Shape] = {
    "attn_norm.weight": ("n_embd",),
    "attn_q.weight": ("n_embd", "n_embd_q"),
    "attn_k.weight": ("n_embd", "n_embd_kv"),
    "attn_v.weight": ("n_embd", "n_embd_kv"),
    "attn_output.weight": ("n_embd_q", "n_embd"),
    "ffn_norm.weight": ("n_embd",),
    "ffn_gate.weight": ("n_embd", "n_ff"),
    "ffn_up.weight": ("n_embd", "n_ff"),
    "ffn_down.weight": ("n_ff", "n_embd"),
}


def decoder_sizes(hp: HParams) -> dict[str, int]:
    """The sizes decoder tensors are written in, after the checks that relate the keys."""
    n_heads, n_kv, head_dim = hp["attention.head_count"], hp["attention.head_count_kv"], hp["attention.key_length"]
    if n_heads % n_kv:
        raise GGUFError(f"{hp.name('attention.head_count_kv')} = {n_kv} does not divide "
                        f"{hp.name('attention.head_count')} = {n_heads}")
    if head_dim % 2:
        raise GGUFError(f"{hp.name('attention.key_length')} = {head_dim} is odd: RoPE rotates pairs of dims")
    if hp["attention.value_length"] != head_dim:
        raise GGUFError(f"{hp.name('attention.value_length')} = {hp['attention.value_length']} differs from "
                        f"{hp.name('attention.key_length')} = {head_dim}: not supported")
    return dict(n_embd=hp["embedding_length"], n_embd_q=n_heads * head_dim, n_embd_kv=n_kv * head_dim,
                n_embd_head=head_dim, n_ff=hp["feed_forward_length"], n_vocab=_vocab_size(hp))


def _vocab_size(hp: HParams) -> int:
    """Rows of the embedding: the tokenizer's vocab when the file has one, as llama.cpp requires (the
    tokenizer checks the vocab's own types); else whatever token_embd holds."""
    tokens = hp.header.metadata.get("tokenizer.ggml.tokens")
    return len(tokens) if isinstance(tokens, list) else hp.tensor("token_embd.weight").dims[-1]


def decoder_buffers(sizes: dict[str, int]) -> dict[str, tuple[str, int]]:
    """Activation buffers of a standard decoder block (rows: T tokens, or R logit rows)."""
    d, q, kv = sizes["n_embd"], sizes["n_embd_q"], sizes["n_embd_kv"]
    return {"x": ("T", d), "h": ("T", d), "q": ("T", q), "k": ("T", kv), "v": ("T", kv), "a": ("T", q),
            "o": ("T", d), "g": ("T", sizes["n_ff"]), "f": ("T", d), "xl": ("R", d), "logits": ("R", sizes["n_vocab"])}


def logits_ops(eps: float, d: int, head: TensorInfo) -> list[Op]:
    """Only the rows that want logits go through the final norm and the (large) output head."""
    return [
        Op("gather", "xl", ("x",)),
        Op("rmsnorm", "xl", ("xl",), ("output_norm.weight",), dict(eps=eps, group=d)),
        Op("matmul", "logits", ("xl",), (head.name,)),
    ]


def row_view(t: TensorInfo, first: int, rows: int, part: str) -> TensorInfo:
    """Rows [first, first + rows) of a 2-D tensor as a tensor of their own (named `t.name[part]`):
    a tensor's rows are contiguous in the file, so a view is an offset and a length, and every
    weight source (file, download stream, wasm heap) reads it like any other tensor."""
    n_rows, row_length = t.shape
    if not 0 <= first < first + rows <= n_rows:
        raise GGUFError(f"tensor {t.name!r} has {n_rows} rows, not the {first + rows} its parts need")
    row_bytes = t.nbytes // n_rows
    return TensorInfo(f"{t.name}[{part}]", (row_length, rows), t.type_id, t.offset + first * row_bytes,
                      rows * row_bytes, view_of=(t.name, first))
