"""LoRA adapters: llama.cpp's GGUF adapter files, loaded at run time and applied beside the base weights.

An adapter changes some matmul weights W [n_out, n_in] of a model by a low-rank product, which
llama.cpp (and Realm) never merge into W, so one model in memory serves any number of adapters:

    y = W·x + scale · (alpha / rank) · B·(A·x)          A [rank, n_in], B [n_out, rank]

The file (`general.type = "adapter"`, `adapter.type = "lora"`, `adapter.lora.alpha`, the model's
`general.architecture`) holds a pair `NAME.lora_a` (ggml dims [n_in, rank]) and `NAME.lora_b`
([rank, n_out]) for each weight NAME it adapts, in F32, F16, BF16 or Q8_0; `read_adapter` checks
it against the model's Plan (every NAME a weight it may adapt, shapes matching) and keeps float32
A and alpha / rank · B. With alpha 0 (or absent) B is not rescaled, as in llama.cpp. NAME is the
file's tensor: where the plan reads one as row views (phi3's attn_qkv as q, k, v; ffn_up as gate,
up), B's rows split the same way and each view gets its rows of B beside the whole A.

An executor holds adapters in numbered slots (`set_adapter(slot, adapter)`, `clear_adapter(slot)`,
at most `max_adapters`); a step says per token which slots apply and at what scale (`Batch.lora`,
`Batch.lora_scale`), so sequences with different adapters, and none, share one forward pass (rows
gathered per adapter, as S-LoRA and Punica do). `AdapterTable` gives slots names for the engine.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Container, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import RealmError
from .gguf import GGUFError, GGUFHeader, TensorInfo, parse_header, read_gguf
from .plan import LORA_PER_TOKEN, Batch, Plan
from .quants import dequantize, quant_type

DEFAULT_MAX_LORA_RANK = 16  # what executors make room for unless told (the GPU preallocates it)
LORA_TYPES = ("F32", "F16", "BF16", "Q8_0")  # what adapter tensors may be stored as
SUFFIXES = {".lora_a": "a", ".lora_b": "b"}


class BadAdapter(RealmError, ValueError):
    """An adapter file that cannot be used with this model: not a LoRA adapter, another
    architecture, a tensor it cannot adapt or with the wrong shape (each named in the message)."""

    code = "bad-adapter"


class AdapterNotFound(RealmError, LookupError):
    """A request names an adapter that is not loaded."""

    code = "no-adapter"


class AdapterConflict(RealmError, RuntimeError):
    """An adapter name already taken, or no free adapter slot left."""

    code = "adapter-conflict"


@dataclass(frozen=True)
class LoraPair:
    """The side path of one weight: delta = b @ (a @ x), alpha / rank already in b."""

    a: np.ndarray  # float32 [rank, n_in]
    b: np.ndarray  # float32 [n_out, rank], times alpha / rank

    @property
    def rank(self) -> int:
        return self.a.shape[0]


_uids = itertools.count(1)


@dataclass(frozen=True)
class Adapter:
    name: str
    arch: str
    alpha: float
    pairs: dict[str, LoraPair]  # adapted weight name -> its pair
    # unique per load: the KV cache computed under one adapter is never reused under another
    uid: int = field(default_factory=lambda: next(_uids))

    @property
    def rank(self) -> int:
        return max(p.rank for p in self.pairs.values())

    @property
    def nbytes(self) -> int:
        arrays = {id(m): m for p in self.pairs.values() for m in (p.a, p.b)}  # a fused tensor's views share A
        return sum(m.nbytes for m in arrays.values())


def adaptable_weights(plan: Plan) -> set[str]:
    """Weights an adapter may change: those only matmul and GLU ops over the step's tokens use (not
    the embedding table, nor the output head, which runs on the logit rows only)."""
    users: dict[str, set[bool]] = {}
    for op in plan.ops:
        per_token = op.kind in ("matmul", "glu") and plan.buffers[op.out][0] == "T"
        for name in op.weights:
            users.setdefault(name, set()).add(per_token)
    return {name for name, kinds in users.items() if kinds == {True}}


def file_tensors(plan: Plan) -> dict[str, list[tuple[str, int, int]]]:
    """The matrices an adapter may name (the file's tensors), each as the plan's weights that read it:
    [(weight, first row, rows)] in row order; one weight of all its rows, or a fused tensor's views."""
    parts: dict[str, list[tuple[str, int, int]]] = {}
    for name, t in plan.weights.items():
        if len(t.dims) == 2:
            tensor, first = t.view_of or (name, 0)
            parts.setdefault(tensor, []).append((name, first, t.dims[1]))
    return {tensor: sorted(views, key=lambda view: view[1]) for tensor, views in parts.items()}


def read_adapter(source: str | Path | bytes | bytearray | memoryview, plan: Plan, name: str = "") -> Adapter:
    """Load an adapter (a file, or the file's bytes) for a model; BadAdapter says what does not fit."""
    label = name or (Path(source).name if isinstance(source, str | Path) else "adapter")
    try:
        if isinstance(source, str | Path):
            if not Path(source).is_file():
                raise BadAdapter(f"adapter {label}: no file at {source}")
            f = read_gguf(source)
            header, data = f.header, f.data
        else:
            data = np.frombuffer(source, np.uint8)
            header = parse_header(source, file_size=len(data))
    except GGUFError as e:
        raise BadAdapter(f"adapter {label}: {e}") from None
    return _check(header, data, plan, label)


def check_header(header: GGUFHeader, plan: Plan, label: str) -> dict[str, dict[str, TensorInfo]]:
    """Check an adapter's header against a model (all but its tensor data: the page checks a
    download after its first bytes); returns its tensors, adapted weight -> {"a": A, "b": B}."""
    meta = header.metadata
    for key, want in (("general.type", "adapter"), ("adapter.type", "lora")):
        if meta.get(key) != want:
            raise BadAdapter(f"adapter {label}: {key} is {meta.get(key)!r}, a LoRA adapter has {want!r}")
    arch = meta.get("general.architecture")
    if arch != plan.arch:
        raise BadAdapter(f"adapter {label} is for architecture {arch!r}; the model is {plan.arch!r}")
    alpha = float(meta.get("adapter.lora.alpha", 0.0))
    if not math.isfinite(alpha):
        raise BadAdapter(f"adapter {label}: adapter.lora.alpha is {alpha}")
    halves: dict[str, dict[str, TensorInfo]] = {}
    for t in header.tensors.values():
        suffix = next((s for s in SUFFIXES if t.name.endswith(s)), None)
        if suffix is None:
            raise BadAdapter(f"adapter {label}: tensor {t.name!r} is neither NAME.lora_a nor NAME.lora_b")
        halves.setdefault(t.name.removesuffix(suffix), {})[SUFFIXES[suffix]] = t
    if not halves:
        raise BadAdapter(f"adapter {label} has no tensors")
    adaptable, tensors = adaptable_weights(plan), file_tensors(plan)
    for base, half in halves.items():
        if base not in tensors:
            raise BadAdapter(f"adapter {label}: tensor {next(iter(half.values())).name!r} adapts {base!r}, "
                             f"which this {plan.arch} model does not have")
        if any(weight not in adaptable for weight, _, _ in tensors[base]):
            raise BadAdapter(f"adapter {label}: tensor {next(iter(half.values())).name!r} adapts {base!r}, which "
                             "is not a matmul weight over the tokens (embeddings and the output head take no adapter)")
        n_in = plan.weights[tensors[base][0][0]].dims[0]
        _check_pair(base, half, (n_in, sum(rows for _, _, rows in tensors[base])), label)
    return halves


def _check_pair(base: str, half: dict[str, TensorInfo], dims: tuple[int, int], label: str) -> None:
    for part in "ab":
        if part not in half:
            raise BadAdapter(f"adapter {label}: {base}.lora_{'ab'[part == 'a']} has no {base}.lora_{part}")
    a, b = half["a"], half["b"]
    n_in, n_out = dims
    rank = a.dims[-1]
    for t, want in ((a, (n_in, rank)), (b, (rank, n_out))):
        if t.dims != want:
            raise BadAdapter(f"adapter {label}: {t.name} has dims {list(t.dims)} (ggml order), {base} of dims "
                             f"{list(dims)} needs {list(want)} (lora_a [n_in, rank], lora_b [rank, n_out])")
        if quant_type(t.type_id).name not in LORA_TYPES:
            raise BadAdapter(f"adapter {label}: {t.name} is {quant_type(t.type_id).name} "
                             f"(adapter tensors may be {', '.join(LORA_TYPES)})")


def _check(header: GGUFHeader, data: np.ndarray, plan: Plan, label: str) -> Adapter:
    halves = check_header(header, plan, label)
    alpha = float(header.metadata.get("adapter.lora.alpha", 0.0))
    tensors, pairs = file_tensors(plan), {}
    for base, half in halves.items():
        whole = _pair(half, data, alpha)
        for weight, first, rows in tensors[base]:  # a fused tensor's view: its rows of B, all of A
            pairs[weight] = whole if rows == len(whole.b) else LoraPair(
                whole.a, np.ascontiguousarray(whole.b[first:first + rows]))
    return Adapter(label, plan.arch, alpha, pairs)


def _pair(half: dict[str, TensorInfo], data: np.ndarray, alpha: float) -> LoraPair:
    def matrix(t: TensorInfo) -> np.ndarray:
        raw = data[t.offset:t.offset + t.nbytes]
        return np.ascontiguousarray(dequantize(raw, t.type_id, t.shape), np.float32)

    scale = np.float32(alpha / half["a"].dims[-1]) if alpha else np.float32(1.0)
    return LoraPair(matrix(half["a"]), np.ascontiguousarray(matrix(half["b"]) * scale))


# --- applying adapters ------------------------------------------------------------------------------

def check_batch(batch: Batch, loaded: Container[int]) -> None:
    """Refuse a step whose adapter table is malformed or names a slot that holds no adapter."""
    if batch.lora is None:
        return
    shape = (len(batch), LORA_PER_TOKEN)
    if batch.lora.shape != shape or batch.lora_scale is None or batch.lora_scale.shape != shape:
        raise ValueError(f"a step's lora and lora_scale must both be [{shape[0]}, {shape[1]}]")
    for slot in np.unique(batch.lora):
        if slot >= 0 and int(slot) not in loaded:
            raise ValueError(f"adapter slot {int(slot)} holds no adapter")


def add_side_paths(y: np.ndarray, x: np.ndarray, weight: str, batch: Batch, adapters: dict[int, Adapter]) -> None:
    """y[t] += scale · B·(A·x[t]) for every adapter of every token of the step that adapts
    `weight` (numpy, in place). Rows of tokens without one are not touched."""
    if batch.lora is None:
        return
    for j in range(LORA_PER_TOKEN):
        column = batch.lora[:, j]
        for slot in np.unique(column[column >= 0]):
            pair = adapters[int(slot)].pairs.get(weight)
            if pair is None:
                continue
            rows = np.nonzero(column == slot)[0]
            y[rows] += batch.lora_scale[rows, j, None] * ((x[rows] @ pair.a.T) @ pair.b.T)


# --- names for slots ----------------------------------------------------------------------------------

class AdapterTable:
    """The adapters an engine's executor holds, by name, in its `max_adapters` slots.

    Unloading takes the name away at once (new requests cannot ask for it), but a slot is reused
    only once no sequence admitted with its adapter is running: those finish with the adapter they
    began with. Not thread-safe: the thread that steps the engine calls it (the server does so
    through its scheduler's `call`).
    """

    def __init__(self, engine) -> None:  # engine.Engine: the executor may be swapped after init
        self.engine = engine
        self.by_name: dict[str, int] = {}
        self.held: dict[int, Adapter] = {}  # slot -> adapter, named or still in use
        self.users: dict[int, int] = {}  # slot -> running sequences using it

    def __contains__(self, name: str) -> bool:
        return name in self.by_name

    def slot(self, name: str) -> int:
        if name not in self.by_name:
            raise AdapterNotFound(f"no adapter {name!r} is loaded" +
                                  (f" (loaded: {', '.join(self.by_name)})" if self.by_name else ""))
        return self.by_name[name]

    def get(self, name: str) -> Adapter:
        return self.held[self.slot(name)]

    def items(self) -> list[tuple[str, Adapter]]:
        return [(name, self.held[slot]) for name, slot in self.by_name.items()]

    def add(self, name: str, adapter: Adapter) -> int:
        """Put the adapter in a free slot of the executor under `name`; returns the slot."""
        if name in self.by_name:
            raise AdapterConflict(f"an adapter named {name!r} is already loaded (unload it first)")
        capacity = self.engine.executor.max_adapters
        free = next((s for s in range(capacity) if s not in self.held), None)
        if free is None:
            raise AdapterConflict(f"all {capacity} adapter slots are in use" if capacity else
                                  "this engine was built without adapter slots (max_adapters = 0)")
        self.engine.executor.set_adapter(free, adapter)
        self.held[free], self.by_name[name], self.users[free] = adapter, free, 0
        return free

    def remove(self, name: str) -> None:
        slot = self.slot(name)
        del self.by_name[name]
        if self.users[slot] == 0:
            self._free(slot)

    def acquire(self, names: Sequence[str]) -> list[int]:
        """The slots of these adapters, held for one sequence until `release`."""
        slots = [self.slot(name) for name in names]
        for slot in slots:
            self.users[slot] += 1
        return slots

    def release(self, slots: Sequence[int]) -> None:
        named = set(self.by_name.values())
        for slot in slots:
            self.users[slot] -= 1
            if self.users[slot] == 0 and slot not in named:
                self._free(slot)

    def _free(self, slot: int) -> None:
        self.engine.executor.clear_adapter(slot)
        del self.held[slot], self.users[slot]
