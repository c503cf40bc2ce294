"""The forward pass's kernels besides matmul, and sampling: one builder per op kind.

Each builder takes the device, the op's parameters and the bindings it reads and writes, composes
and compiles its pipelines (cached per device by `compose.pipeline`) and creates its bind groups
once, at load time. `dispatches(n)` then returns what one step of n rows (T tokens, or R logit
rows) adds to the step's command buffer; the bindings' contents may change between steps, the
bindings themselves never do.

Conventions: activations are f32 [rows, width], row-major; `tokens`, `positions`, `slots` and
`logit_rows` are int32 per row. Every kernel takes its row count from the dispatch size, so none
needs a step uniform. Kernels that may run in place (rmsnorm, rope, add) do when given the same
binding for input and output.
"""

from __future__ import annotations

import math
import struct
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..sampling import SamplingParams
from . import compose
from .device import COPY_DST, STORAGE, STORAGE_RW, Binding, Buffer, Device, Dispatch
from .matmul import GpuWeight, check_snippet

ACTIVATIONS = {"gelu": True, "silu": False}  # act name -> glu.wgsl's GELU const

TOP_K_CAP = 64  # the GPU sampler keeps at most this many candidates: top_k 0 or above means 64
SAMPLE_CHUNK = 4096  # logits per stage-1 sampling workgroup
_M32 = 0xFFFFFFFF


@dataclass(frozen=True)
class Tuning:
    """Kernel shapes for one class of adapter."""

    wg: int  # threads of the elementwise and norm workgroups (a power of two)
    attn_wg: int  # threads of an attention workgroup = keys per tile
    attn_split: int  # KV-range chunks per token (workgroups in parallel) for short steps; 1: never
    attn_split_max_t: int  # steps of at most this many tokens split the KV range
    sample_wg: int  # threads of a sampling workgroup (a power of two dividing SAMPLE_CHUNK)


# Keyed by `device.is_fallback_adapter`: CPU adapters pay a lot per barrier and gain nothing from
# more workgroups than cores, so they get small workgroups and no split attention.
TUNING = {
    False: Tuning(wg=256, attn_wg=64, attn_split=32, attn_split_max_t=4, sample_wg=256),
    True: Tuning(wg=64, attn_wg=32, attn_split=1, attn_split_max_t=0, sample_wg=64),
}


def _reduce_part(device: Device) -> str:
    return "reduce_subgroup.wgsl" if "subgroups" in device.features else "reduce_shared.wgsl"


def _same(a: Binding, b: Binding) -> bool:
    return a[0] is b[0] and a[1] == b[1]


def _check_rows(label: str, n: int, *bindings: tuple[str, Binding, int]) -> None:
    """Refuse a step of n rows that overruns a binding of `row_bytes` per row."""
    for name, (_, _, size), row_bytes in bindings:
        if n * row_bytes > size:
            raise ValueError(f"{label}: {n} rows of {row_bytes} bytes do not fit the {size}-byte {name} binding")


def _groups(n: int, per_group: int) -> int:
    return -(-n // per_group)


_scratch: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def scratch(device: Device, name: str, size: int) -> Buffer:
    """A device buffer shared by every op that asks for (name, size): layers run one after another,
    so their temporary results can live in the same place."""
    cache = _scratch.setdefault(device, {})
    if (name, size) not in cache:
        cache[name, size] = device.create_buffer(size, STORAGE_RW, name)
    return cache[name, size]


def whole(buf: Buffer, size: int) -> Binding:
    return (buf, 0, size)


class _Op:
    """A kernel with its bind groups built; subclasses fill `self.steps` with (pipeline, bind group,
    workgroups per row as (x, z)) and set `self.row_bindings` for the capacity check."""

    label = ""
    steps: list
    row_bindings: tuple[tuple[str, Binding, int], ...] = ()

    def dispatches(self, n: int) -> list[Dispatch]:
        _check_rows(self.label, n, *self.row_bindings)
        return [(pipe, bg, (gx, n, gz)) for pipe, bg, (gx, gz) in self.steps]


class RmsNorm(_Op):
    """y = x / sqrt(mean(x², per group of `group`) + eps) * w, or y += that with `residual`.

    `w` holds `group` floats (shared by every group of a row, as a per-head Q/K norm) or `width`.
    """

    def __init__(self, device: Device, x: Binding, w: Binding, y: Binding, *, width: int, group: int,
                 eps: float, residual: bool = False, tuning: Tuning | None = None) -> None:
        tune = tuning or TUNING[device.is_fallback_adapter]
        if width % group:
            raise ValueError(f"rmsnorm: width {width} is not a multiple of the group {group}")
        w_len = w[2] // 4
        if w_len not in (group, width):
            raise ValueError(f"rmsnorm: weight of {w_len} floats fits neither the group {group} nor the row {width}")
        in_place = _same(x, y)
        if in_place and residual:
            raise ValueError("rmsnorm: a residual norm cannot run in place")
        wg = min(tune.wg, 1 << max(5, (group - 1).bit_length()))
        consts = dict(WIDTH=width, GROUP=group, W_LEN=w_len, EPS=float(eps), RESIDUAL=residual,
                      IN_PLACE=in_place, WG=wg, R=1)
        subgroups = "subgroups" in device.features
        pipe = compose.pipeline(device, (_reduce_part(device), "rmsnorm.wgsl"), consts, subgroups=subgroups,
                                label=f"rmsnorm {width}/{group}")
        # In place, the unread `x` slot takes the weight: any buffer not aliasing y will do.
        bg = device.create_bind_group(pipe, [y, w, w if in_place else x])
        self.label = "rmsnorm"
        self.steps = [(pipe, bg, (width // group, 1))]
        self.row_bindings = (("x", x, width * 4), ("y", y, width * 4))


class Rope(_Op):
    """Rotary embedding of every head's first n_rot dims at `positions` (NeoX or adjacent pairs),
    theta_i = position * scale * base^(-2i / n_rot) / freq_factors[i]."""

    def __init__(self, device: Device, x: Binding, y: Binding, positions: Binding, *, n_heads: int,
                 head_dim: int, n_rot: int, base: float, scale: float, neox: bool,
                 freq_factors: np.ndarray | None = None, tuning: Tuning | None = None) -> None:
        tune = tuning or TUNING[device.is_fallback_adapter]
        if n_rot % 2 or n_rot > head_dim:
            raise ValueError(f"rope: n_rot {n_rot} must be even and at most head_dim {head_dim}")
        half = n_rot // 2
        inv = base ** (-np.arange(0, n_rot, 2, dtype=np.float64) / n_rot)
        if freq_factors is not None:
            inv = inv / np.asarray(freq_factors, np.float64)[:half]
        turns = (inv * scale / (2 * math.pi)).astype(np.float32)
        table = device.create_buffer(turns.nbytes, STORAGE | COPY_DST, "rope turns")
        device.write_buffer(table, 0, turns.tobytes())
        in_place = _same(x, y)
        wg = min(tune.wg, 1 << max(5, (n_heads * half - 1).bit_length()))
        consts = dict(N_HEADS=n_heads, HEAD_DIM=head_dim, N_ROT=n_rot, NEOX=bool(neox), IN_PLACE=in_place, WG=wg)
        pipe = compose.pipeline(device, ("rope.wgsl",), consts, label=f"rope {n_heads}x{head_dim}")
        table_binding = (table, 0, turns.nbytes)
        bg = device.create_bind_group(pipe, [y, positions, table_binding, table_binding if in_place else x])
        self.label = "rope"
        self.steps = [(pipe, bg, (_groups(n_heads * half, wg), 1))]
        row = n_heads * head_dim * 4
        self.row_bindings = (("x", x, row), ("y", y, row), ("positions", positions, 4))


class Add(_Op):
    """y = a + b (in place when y is a)."""

    def __init__(self, device: Device, a: Binding, b: Binding, y: Binding, *, width: int,
                 tuning: Tuning | None = None) -> None:
        tune = tuning or TUNING[device.is_fallback_adapter]
        in_place = _same(a, y)
        pipe = compose.pipeline(device, ("add.wgsl",), dict(WIDTH=width, IN_PLACE=in_place, WG=tune.wg),
                                label=f"add {width}")
        bg = device.create_bind_group(pipe, [y, b, b if in_place else a])
        self.label = "add"
        self.steps = [(pipe, bg, (_groups(width, tune.wg), 1))]
        self.row_bindings = (("a", a, width * 4), ("b", b, width * 4), ("y", y, width * 4))


class Glu(_Op):
    """y = act(gate) * up elementwise (the gate and up projections come from two matmuls)."""

    def __init__(self, device: Device, gate: Binding, up: Binding, y: Binding, *, width: int, act: str,
                 tuning: Tuning | None = None) -> None:
        tune = tuning or TUNING[device.is_fallback_adapter]
        if act not in ACTIVATIONS:
            raise ValueError(f"glu: unknown activation {act!r} (known: {', '.join(ACTIVATIONS)})")
        consts = dict(WIDTH=width, GELU=ACTIVATIONS[act], WG=tune.wg)
        pipe = compose.pipeline(device, ("glu.wgsl",), consts, label=f"glu {act} {width}")
        self.label = "glu"
        self.steps = [(pipe, device.create_bind_group(pipe, [y, gate, up]), (_groups(width, tune.wg), 1))]
        self.row_bindings = (("gate", gate, width * 4), ("up", up, width * 4), ("y", y, width * 4))


class Gather(_Op):
    """y[r] = x[rows[r]]: `dispatches(R)`."""

    def __init__(self, device: Device, x: Binding, rows: Binding, y: Binding, *, width: int,
                 tuning: Tuning | None = None) -> None:
        tune = tuning or TUNING[device.is_fallback_adapter]
        pipe = compose.pipeline(device, ("gather.wgsl",), dict(WIDTH=width, WG=tune.wg), label=f"gather {width}")
        self.label = "gather"
        self.steps = [(pipe, device.create_bind_group(pipe, [y, x, rows]), (_groups(width, tune.wg), 1))]
        self.row_bindings = (("rows", rows, 4), ("y", y, width * 4))


class Embed(_Op):
    """y[t] = table[tokens[t]] * scale, dequantized from the table's GGML blocks (one dispatch per
    binding-sized chunk of the table)."""

    def __init__(self, device: Device, table: GpuWeight, tokens: Binding, y: Binding, *, scale: float,
                 tuning: Tuning | None = None) -> None:
        tune = tuning or TUNING[device.is_fallback_adapter]
        check_snippet(table.quant)
        width = table.k
        wg = min(tune.wg, 1 << max(5, (width // 8 - 1).bit_length()))
        self.label = "embed"
        self.steps = []
        for c in table.chunks:
            consts = dict(WIDTH=width, ROW0=c.row0, ROWS=c.rows, SCALE=float(scale), WG=wg)
            pipe = compose.pipeline(device, ("blocks.wgsl", table.quant.shader, "embed.wgsl"), consts,
                                    label=f"embed {table.quant.name} {width}")
            bg = device.create_bind_group(pipe, [(c.buffer, 0, c.size), tokens, y])
            self.steps.append((pipe, bg, (_groups(width // 8, wg), 1)))
        self.row_bindings = (("tokens", tokens, 4), ("y", y, width * 4))


class Attention:
    """Causal (optionally sliding-window) GQA attention of a step's tokens over one layer's KV
    cache, after storing the step's k and v in it at (slots[t], positions[t]).

    The cache is owned here: `k_cache` and `v_cache` hold [n_slots, n_ctx, n_kv_heads * head_dim]
    f32 (f16 with `kv_f16`). Steps of up to `tuning.attn_split_max_t` tokens split each token's key
    range over `tuning.attn_split` workgroups and merge them in a third dispatch.
    """

    def __init__(self, device: Device, q: Binding, k: Binding, v: Binding, positions: Binding, slots: Binding,
                 y: Binding, *, n_heads: int, n_kv_heads: int, head_dim: int, n_ctx: int, n_slots: int,
                 window: int, scale: float, kv_f16: bool = False, tuning: Tuning | None = None,
                 label: str = "attention") -> None:
        self.tuning = tune = tuning or TUNING[device.is_fallback_adapter]
        if n_heads % n_kv_heads or head_dim % 4:
            raise ValueError(f"{label}: {n_heads} heads over {n_kv_heads} KV heads of dim {head_dim} "
                             "(need whole groups and a dim divisible by 4)")
        if kv_f16 and "shader-f16" not in device.features:
            raise ValueError(f"{label}: an f16 KV cache needs 'shader-f16', which this device lacks")
        group = n_heads // n_kv_heads
        shared = group * head_dim * 4 + 2 * group * tune.attn_wg * 4
        if shared > device.limits["max_compute_workgroup_storage_size"]:
            raise ValueError(f"{label}: {group} query heads of dim {head_dim} need {shared} bytes of "
                             "workgroup memory, more than this device has")
        kv_row = n_kv_heads * head_dim
        cache_bytes = n_slots * n_ctx * kv_row * (2 if kv_f16 else 4)
        if cache_bytes > device.limits["max_storage_buffer_binding_size"]:
            raise ValueError(f"{label}: a {cache_bytes}-byte KV cache exceeds the storage binding limit")
        self.label, self.n_heads, self.n_kv_heads, self.head_dim = label, n_heads, n_kv_heads, head_dim
        self.k_cache = device.create_buffer(cache_bytes, STORAGE_RW, f"{label} k cache")
        self.v_cache = device.create_buffer(cache_bytes, STORAGE_RW, f"{label} v cache")
        record = (head_dim + 4) * 4  # one partial result: head_dim sums, then max and sum of p
        split = tune.attn_split if tune.attn_split_max_t > 0 else 1
        part_bytes = max(16, tune.attn_split_max_t * n_heads * split * record)
        partials = (scratch(device, "attention partials", part_bytes), 0, part_bytes)
        bindings = [y, partials, (self.k_cache, 0, cache_bytes), (self.v_cache, 0, cache_bytes), q, k, v,
                    positions, slots]
        shape = dict(HD=head_dim, G=group, NH=n_heads, NKV=n_kv_heads, N_CTX=n_ctx, N_SLOTS=n_slots,
                     WINDOW=window, SCALE=float(scale), WG=tune.attn_wg)

        def stage(stage: int, n_split: int) -> tuple:
            pipe = compose.pipeline(device, ("attention.wgsl",), dict(shape, SPLIT=n_split, STAGE=stage),
                                    f16=kv_f16, label=f"{label} stage {stage}")
            return pipe, device.create_bind_group(pipe, bindings)

        self.store = stage(0, 1), (_groups(kv_row // 4, tune.attn_wg), 1)
        self.direct = stage(1, 1), (1, n_kv_heads)
        self.split = [(stage(1, split), (split, n_kv_heads)), (stage(2, split), (n_heads, 1))] if split > 1 else []
        self.row_bindings = (("q", q, n_heads * head_dim * 4), ("k", k, kv_row * 4), ("v", v, kv_row * 4),
                             ("positions", positions, 4), ("slots", slots, 4), ("y", y, n_heads * head_dim * 4))

    def dispatches(self, n: int) -> list[Dispatch]:
        _check_rows(self.label, n, *self.row_bindings)
        steps = [self.store] + (self.split if n <= self.tuning.attn_split_max_t and self.split else [self.direct])
        return [(pipe, bg, (gx, n, gz)) for (pipe, bg), (gx, gz) in steps]


def nucleus_threshold(top_p: float) -> float:
    """sampling.sample cuts where the f32 cumulative mass reaches top_p * (1 - 1e-6), compared in
    f64: the smallest f32 at or above that bound makes the same cut in f32."""
    bound = top_p * (1 - 1e-6)
    t = np.float32(bound)
    return float(t if float(t) >= bound else np.nextafter(t, np.float32(np.inf)))


def pack_sampling(rows: Sequence[tuple[SamplingParams, int]]) -> bytes:
    """The sampler's per-row parameters: (params, step counter) for each logit row."""
    out = bytearray()
    for p, step in rows:
        k = 1 if p.greedy else min(p.top_k or TOP_K_CAP, TOP_K_CAP)
        out += struct.pack("<fIfII", p.temperature, k, nucleus_threshold(p.top_p), p.seed & _M32, step & _M32)
    return bytes(out)


SAMPLING_ROW_BYTES = struct.calcsize("<fIfII")


class Sampler:
    """Token ids [R] from logits [R, n_vocab] on the GPU: sampling.sample's rules with top_k capped
    at TOP_K_CAP (top_k 0 or larger means TOP_K_CAP). `params` holds `pack_sampling` rows; the
    host reads back `tokens` (int32 [R])."""

    def __init__(self, device: Device, logits: Binding, params: Binding, tokens: Binding, *, n_vocab: int,
                 tuning: Tuning | None = None) -> None:
        tune = tuning or TUNING[device.is_fallback_adapter]
        # Without subgroups the shared-memory sum holds 16 floats per thread: keep workgroups small.
        wg = tune.sample_wg if "subgroups" in device.features else min(tune.sample_wg, 64)
        n_chunks = _groups(n_vocab, SAMPLE_CHUNK)
        max_rows = logits[2] // (4 * n_vocab)
        cand_bytes = max(1, max_rows) * n_chunks * TOP_K_CAP * 8
        cand = (device.create_buffer(cand_bytes, STORAGE_RW, "sampling candidates"), 0, cand_bytes)
        consts = dict(V=n_vocab, CAP=TOP_K_CAP, NB=n_chunks, ID_ROUNDS=_groups(n_vocab.bit_length(), 4),
                      WG=wg, R=16)
        subgroups = "subgroups" in device.features
        self.steps = []
        for stage, e, grid_x in ((1, SAMPLE_CHUNK // wg, n_chunks), (2, _groups(n_chunks * TOP_K_CAP, wg), 1)):
            pipe = compose.pipeline(device, (_reduce_part(device), "sample.wgsl"), dict(consts, E=e, STAGE=stage),
                                    subgroups=subgroups, label=f"sample stage {stage}")
            bg = device.create_bind_group(pipe, [logits, params, cand, tokens])
            self.steps.append((pipe, bg, grid_x))
        self.rows = (("logits", logits, n_vocab * 4), ("params", params, SAMPLING_ROW_BYTES), ("tokens", tokens, 4))

    def dispatches(self, n: int) -> list[Dispatch]:
        _check_rows("sample", n, *self.rows)
        return [(pipe, bg, (gx, n, 1)) for pipe, bg, gx in self.steps]
