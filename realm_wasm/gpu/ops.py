"""The forward pass's kernels besides matmul, and sampling: one builder per op kind.

Each builder takes the device, the op's parameters and the bindings it reads and writes, composes
and compiles its pipelines (cached per device by `compose.pipeline`) and creates its bind groups
once, at load time. `dispatches(n)` then returns what one step of n rows (T tokens, or R logit
rows) adds to the step's command buffer; the bindings' contents may change between steps, the
bindings themselves never do.

Conventions: activations are f32 [rows, width], row-major; `tokens`, `positions`, `slots` and
`logit_rows` are int32 per row. Every kernel takes its row count from the dispatch size, so none
needs a step uniform. RmsNorm and Add run in place when given the same binding for input and
output; Rope always runs in place.

Fusions, because a dispatch costs ~5 us however small (H100, wgpu-py): a Rope also applies the
Q/K norm before rotating (`norm=`), for the keys can be the attention's KV store (`kv=`, with
the Attention built with k = v = None), and rotates the queries in the same dispatch (`also=`);
an RmsNorm can add into the residual (`residual=True`) and then compute the next pre-norm
(`then=`), and at decode the mat-vec before it runs that norm itself (matmul.ResidualNorm); split
attention is merged by its last workgroup. A gemma layer's non-matmul ops are thus 2 dispatches at
decode: rope q + k (+ store) and attention (unfused, one per plan op: 11).
"""

from __future__ import annotations

import math
import struct
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..sampling import TOP_K_CAP, SamplingParams
from . import compose
from .device import COPY_DST, STORAGE, STORAGE_RW, Binding, Buffer, Device, Dispatch
from .matmul import GpuWeight, check_snippet
from .tuning import Tuning, tuning_for

ACTIVATIONS = {"gelu": True, "silu": False}  # act name -> glu.wgsl's GELU const

_M32 = 0xFFFFFFFF


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

    `w` holds `group` floats (shared by every group of a row, as a per-head Q/K norm) or `width`;
    None, with `residual`, adds x itself (y += x: the residual add of a model without post-norms).
    `then` = (w2, h) also writes h = rmsnorm(new y) * w2: a post-norm, the residual add and the
    next pre-norm in one dispatch.
    """

    def __init__(self, device: Device, x: Binding, w: Binding | None, y: Binding, *, width: int, group: int,
                 eps: float, residual: bool = False, then: tuple[Binding, Binding] | None = None,
                 tuning: Tuning | None = None) -> None:
        tune = tuning or tuning_for(device)
        if width % group:
            raise ValueError(f"rmsnorm: width {width} is not a multiple of the group {group}")
        if w is None and not residual:
            raise ValueError("rmsnorm: without a weight only the residual add (residual=True) is left")
        post_norm = w is not None
        w = w if post_norm else x  # unread without a post-norm: x is bound read-only anyway
        w_len = w[2] // 4 if post_norm else width
        if w_len not in (group, width):
            raise ValueError(f"rmsnorm: weight of {w_len} floats fits neither the group {group} nor the row {width}")
        in_place = _same(x, y)
        if in_place and residual:
            raise ValueError("rmsnorm: a residual norm cannot run in place")
        wg = min(tune.wg, 1 << max(5, (group - 1).bit_length()))
        consts = dict(WIDTH=width, GROUP=group, W_LEN=w_len, EPS=float(eps), POST_NORM=post_norm, RESIDUAL=residual,
                      THEN=then is not None, IN_PLACE=in_place, WG=wg, R=1)
        subgroups = "subgroups" in device.features
        pipe = compose.pipeline(device, (_reduce_part(device), "rmsnorm.wgsl"), consts, subgroups=subgroups,
                                label=f"rmsnorm {width}/{group}")
        # Unread slots take the weight; an unwritten h, a scratch buffer.
        w2, h = then or (w, (scratch(device, "unused", 512), 0, 256))
        bg = device.create_bind_group(pipe, [y, w, w if in_place else x, h, w2])
        self.label = "rmsnorm"
        self.steps = [(pipe, bg, (width // group, 1))]
        self.row_bindings = (("x", x, width * 4), ("y", y, width * 4), ("h", h, width * 4 if then else 0))


@dataclass(frozen=True)
class RopeHeads:
    """Another activation a Rope rotates in the same dispatch, by the same angles (the queries
    beside the keys): `norm` as Rope's; never stored."""

    x: Binding  # [T, n_heads * head_dim], rotated in place
    n_heads: int
    norm: tuple[np.ndarray, float] | None = None


class Rope(_Op):
    """Rotary embedding, in place, of every head's first n_rot dims at `positions` (NeoX or
    adjacent pairs), theta_i = position * scale * base^(-2i / n_rot) / freq_factors[i].

    Rope runs in place: `y` must be `x`.
    `norm` = (weight of head_dim floats, eps) first applies a per-head RMSNorm (Q/K norms).
    `kv` = (attention, v, slots) then stores the rotated heads and v's into that attention's KV
    cache, for an Attention built with k = v = None: the keys' norm, rope and KV store in one
    dispatch. (With n_rot=0 it only stores: the Attention's own store when given k and v.)
    `also` rotates another activation's heads in the same dispatch: the queries with the keys.
    """

    def __init__(self, device: Device, x: Binding, y: Binding, positions: Binding, *, n_heads: int,
                 head_dim: int, n_rot: int, base: float, scale: float, neox: bool,
                 freq_factors: np.ndarray | None = None, norm: tuple[np.ndarray, float] | None = None,
                 kv: tuple[Attention, Binding, Binding] | None = None, also: RopeHeads | None = None) -> None:
        if not _same(x, y):
            raise ValueError("rope runs in place: pass the same binding as x and y")
        if also is not None and _same(also.x, x):
            raise ValueError("rope: `also` must be another activation than x")
        if n_rot % 2 or n_rot > head_dim:
            raise ValueError(f"rope: n_rot {n_rot} must be even and at most head_dim {head_dim}")
        half = n_rot // 2
        inv = base ** (-np.arange(0, n_rot, 2, dtype=np.float64) / n_rot)
        if freq_factors is not None:
            inv = inv / np.asarray(freq_factors, np.float64)[:half]
        turns = np.zeros(max(half, 1), np.float32)
        turns[:half] = inv * scale / (2 * math.pi)
        also_heads, also_norm = (also.n_heads, also.norm) if also else (0, None)
        # One read-only table: the turns, then the norm weights of x and of `also` (where normed).
        weights = [np.asarray(n[0], np.float32) for n in (norm, also_norm) if n]
        if any(w.shape != (head_dim,) for w in weights):
            raise ValueError(f"rope: norm weights must hold head_dim ({head_dim}) floats")
        data = np.concatenate([turns, *weights])
        table = (device.create_buffer(data.nbytes, STORAGE | COPY_DST, "rope table"), 0, data.nbytes)
        device.write_buffer(table[0], 0, data.tobytes())
        w_at, also_w_at = len(turns), len(turns) + (head_dim if norm else 0)
        row = n_heads * head_dim
        # Unused bindings still need writable buffers that alias nothing.
        unused = scratch(device, "unused", 768)
        idle = [(unused, at, 256) for at in (0, 256, 512)]
        also_x = also.x if also else idle[2]
        if kv is not None:
            attention, v, slots = kv
            if (attention.n_kv_heads, attention.head_dim) != (n_heads, head_dim):
                raise ValueError(f"rope: {n_heads} heads of {head_dim} do not fit the KV cache of "
                                 f"{attention.label} ({attention.n_kv_heads} x {attention.head_dim})")
            first, *later = attention.kv_groups
            caches = [first.k, first.v]
            cache_shape = dict(N_CTX=attention.n_ctx, SLOT0=0, N_SLOTS=first.n_slots)
        else:
            v, slots, caches, later = table, positions, idle[:2], []
            cache_shape = dict(N_CTX=1, SLOT0=0, N_SLOTS=1)
        wg = 1 << max(5, (half - 1).bit_length())
        consts = dict(N_HEADS=n_heads, HEAD_DIM=head_dim, N_ROT=n_rot, NEOX=bool(neox), NORM=norm is not None,
                      EPS=float(norm[1]) if norm else 0.0, W_AT=w_at, STORE=kv is not None, **cache_shape,
                      ALSO_HEADS=also_heads, ALSO_NORM=also_norm is not None,
                      ALSO_EPS=float(also_norm[1]) if also_norm else 0.0, ALSO_W_AT=also_w_at, WG=wg, R=1)
        subgroups = "subgroups" in device.features
        pipe = compose.pipeline(device, (_reduce_part(device), "rope.wgsl"), consts, subgroups=subgroups,
                                f16=kv is not None and kv[0].kv_f16, label=f"rope {also_heads}+{n_heads}x{head_dim}")
        bindings = [x, positions, table, slots, v, *caches, also_x]
        self.label = "rope"
        self.steps = [(pipe, device.create_bind_group(pipe, bindings), (also_heads + n_heads, 1))]
        for g in later:  # the cache's other slot groups: the rotated keys stored as they are, one dispatch each
            store = dict(consts, N_ROT=0, NORM=False, ALSO_HEADS=0, ALSO_NORM=False, SLOT0=g.slot0, N_SLOTS=g.n_slots)
            pipe = compose.pipeline(device, (_reduce_part(device), "rope.wgsl"), store, subgroups=subgroups,
                                    f16=kv[0].kv_f16, label=f"kv store {n_heads}x{head_dim} slots {g.slot0}+")
            bindings = [x, positions, table, slots, v, g.k, g.v, idle[2]]
            self.steps.append((pipe, device.create_bind_group(pipe, bindings), (n_heads, 1)))
        self.row_bindings = (("x", x, row * 4), ("positions", positions, 4), ("slots", slots, 4 if kv else 0),
                             ("v", v, row * 4 if kv else 0), ("also", also_x, also_heads * head_dim * 4))


class Add(_Op):
    """y = a + b (in place when y is a); with `bias`, b is one row [width] added to every row
    (qwen2's q, k, v biases)."""

    def __init__(self, device: Device, a: Binding, b: Binding, y: Binding, *, width: int, bias: bool = False,
                 tuning: Tuning | None = None) -> None:
        tune = tuning or tuning_for(device)
        in_place = _same(a, y)
        pipe = compose.pipeline(device, ("add.wgsl",), dict(WIDTH=width, IN_PLACE=in_place, B_PER_ROW=not bias,
                                                            WG=tune.wg), label=f"{'bias' if bias else 'add'} {width}")
        bg = device.create_bind_group(pipe, [y, b, b if in_place else a])
        self.label = "bias" if bias else "add"
        self.steps = [(pipe, bg, (_groups(width, tune.wg), 1))]
        self.row_bindings = (("a", a, width * 4), ("b", b, 0 if bias else width * 4), ("y", y, width * 4))


class Softcap(_Op):
    """y = cap · tanh(y / cap) in place (gemma2's final logits)."""

    def __init__(self, device: Device, y: Binding, *, width: int, cap: float, tuning: Tuning | None = None) -> None:
        if not cap > 0:
            raise ValueError(f"softcap: cap must be positive, got {cap}")
        tune = tuning or tuning_for(device)
        pipe = compose.pipeline(device, ("softcap.wgsl",), dict(WIDTH=width, CAP=float(cap), WG=tune.wg),
                                label=f"softcap {width}")
        self.label = "softcap"
        self.steps = [(pipe, device.create_bind_group(pipe, [y]), (_groups(width, tune.wg), 1))]
        self.row_bindings = (("y", y, width * 4),)


class Glu(_Op):
    """y = act(gate) * up elementwise. gate and up rows are `row_stride` floats apart (default
    `width`), up `up_offset` floats into its binding: a mat-mat result of [rows, 2 * width], gate
    columns first, is bound as both with row_stride = 2 * width and up_offset = width."""

    def __init__(self, device: Device, gate: Binding, up: Binding, y: Binding, *, width: int, act: str,
                 tuning: Tuning | None = None, row_stride: int | None = None, up_offset: int = 0) -> None:
        tune = tuning or tuning_for(device)
        if act not in ACTIVATIONS:
            raise ValueError(f"glu: unknown activation {act!r} (known: {', '.join(ACTIVATIONS)})")
        stride = row_stride or width
        consts = dict(WIDTH=width, STRIDE=stride, UP=up_offset, GELU=ACTIVATIONS[act], WG=tune.wg)
        pipe = compose.pipeline(device, ("glu_act.wgsl", "glu.wgsl"), consts, label=f"glu {act} {width}")
        self.label = "glu"
        self.steps = [(pipe, device.create_bind_group(pipe, [y, gate, up]), (_groups(width, tune.wg), 1))]
        self.row_bindings = (("gate", gate, stride * 4), ("up", up, stride * 4), ("y", y, width * 4))


class Gather(_Op):
    """y[r] = x[rows[r]]: `dispatches(R)`."""

    def __init__(self, device: Device, x: Binding, rows: Binding, y: Binding, *, width: int,
                 tuning: Tuning | None = None) -> None:
        tune = tuning or tuning_for(device)
        pipe = compose.pipeline(device, ("gather.wgsl",), dict(WIDTH=width, WG=tune.wg), label=f"gather {width}")
        self.label = "gather"
        self.steps = [(pipe, device.create_bind_group(pipe, [y, x, rows]), (_groups(width, tune.wg), 1))]
        self.row_bindings = (("rows", rows, 4), ("y", y, width * 4))


class Embed(_Op):
    """y[t] = table[tokens[t]] * scale, dequantized from the table's GGML blocks (one dispatch per
    binding-sized chunk of the table)."""

    def __init__(self, device: Device, table: GpuWeight, tokens: Binding, y: Binding, *, scale: float,
                 tuning: Tuning | None = None) -> None:
        tune = tuning or tuning_for(device)
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


@dataclass(frozen=True)
class KvGroup:
    """Slots slot0 .. slot0 + n_slots - 1 of one layer's KV cache: their keys and their values,
    [n_slots, n_ctx, n_kv_heads * head_dim] each."""

    slot0: int
    n_slots: int
    k: Binding
    v: Binding


class Attention:
    """Causal (optionally sliding-window) GQA attention of a step's tokens over one layer's KV cache,
    its scores soft-capped to c·tanh(s / c) where `softcap` c > 0 (gemma2).

    The cache is owned here: [n_slots, n_ctx, n_kv_heads * head_dim] f32 (f16 with `kv_f16`) for
    keys and for values, cut into `kv_groups` of whole slots, each in its own buffers, where one
    would exceed the storage binding limit (one dispatch per group, for the tokens of its slots).
    Given the step's `k` and `v`, the attention first stores them there (one more dispatch a group);
    with k = v = None the keys' Rope does (`kv=(this, v, slots)`). Steps of up to
    `tuning.attn_split_max_t` tokens split each token's key range over `tuning.attn_split`
    workgroups, the last of which to finish merges their results (still one dispatch).
    """

    def __init__(self, device: Device, q: Binding, k: Binding | None, v: Binding | None, positions: Binding,
                 slots: Binding, y: Binding, *,
                 n_heads: int, n_kv_heads: int, head_dim: int, n_ctx: int, n_slots: int, window: int,
                 scale: float, softcap: float = 0.0, kv_f16: bool = False, tuning: Tuning | None = None,
                 label: str = "attention") -> None:
        self.tuning = tune = tuning or tuning_for(device)
        if n_heads % n_kv_heads or head_dim % 4:
            raise ValueError(f"{label}: {n_heads} heads over {n_kv_heads} KV heads of dim {head_dim} "
                             "(need whole groups and a dim divisible by 4)")
        if kv_f16 and "shader-f16" not in device.features:
            raise ValueError(f"{label}: an f16 KV cache needs 'shader-f16', which this device lacks")
        if (k is None) != (v is None):
            raise ValueError(f"{label}: give both k and v (the attention stores them) or neither (a Rope does)")
        group, hd4 = n_heads // n_kv_heads, head_dim // 4
        if hd4 > tune.attn_wg or tune.attn_split > tune.attn_wg:
            raise ValueError(f"{label}: a workgroup of {tune.attn_wg} threads is too small for head_dim "
                             f"{head_dim} or {tune.attn_split} splits")
        # Heads per workgroup: as many of the group as give every thread one output vec4.
        hb = max(b for b in range(1, group + 1) if group % b == 0 and b * hd4 <= tune.attn_wg)
        slot_bytes = n_ctx * n_kv_heads * head_dim * (2 if kv_f16 else 4)
        limit = device.limits["max_storage_buffer_binding_size"]
        if slot_bytes > limit:
            raise ValueError(f"{label}: one sequence's KV cache ({n_ctx} positions, {slot_bytes} bytes) exceeds "
                             f"the device's storage binding limit ({limit} bytes): use a shorter context")
        self.label, self.n_heads, self.n_kv_heads, self.head_dim = label, n_heads, n_kv_heads, head_dim
        self.n_ctx, self.n_slots, self.kv_f16, self.slot_bytes = n_ctx, n_slots, kv_f16, slot_bytes
        per_group = min(n_slots, limit // slot_bytes)
        self.kv_groups = []
        for slot0 in range(0, n_slots, per_group):
            n = min(per_group, n_slots - slot0)
            keys, values = ((device.create_buffer(n * slot_bytes, STORAGE_RW, f"{label} {kind} cache {slot0}+{n}"),
                             0, n * slot_bytes) for kind in "kv")
            self.kv_groups.append(KvGroup(slot0, n, keys, values))
        record = (head_dim + 4) * 4  # one partial result: head_dim sums, then max and sum of p
        split = tune.attn_split if tune.attn_split_max_t > 0 else 1
        part_bytes = max(16, tune.attn_split_max_t * n_heads * split * record)
        partials = (scratch(device, "attention partials", part_bytes), 0, part_bytes)
        blocks = n_kv_heads * group // hb
        # one arrival counter per (token, workgroup block) of a split step; zero when idle
        count_bytes = max(16, tune.attn_split_max_t * blocks * 4)
        arrived = (scratch(device, "attention arrivals", count_bytes), 0, count_bytes)
        shape = dict(HD=head_dim, G=group, HB=hb, NH=n_heads, NKV=n_kv_heads, N_CTX=n_ctx, WINDOW=window,
                     SCALE=float(scale), SOFTCAP=float(softcap), WG=tune.attn_wg)

        def kernels(n_split: int) -> tuple[int, list[tuple]]:  # chunks a key range, (pipeline, bind group)s
            launches = []
            for g in self.kv_groups:
                pipe = compose.pipeline(device, ("attention.wgsl",),
                                        dict(shape, SPLIT=n_split, SLOT0=g.slot0, N_SLOTS=g.n_slots), f16=kv_f16,
                                        label=f"{label} split {n_split} slots {g.slot0}+{g.n_slots}")
                bindings = [y, partials, g.k, g.v, q, positions, slots, arrived]
                launches.append((pipe, device.create_bind_group(pipe, bindings)))
            return n_split, launches

        self.blocks = blocks
        self.direct = kernels(1)
        self.split = kernels(split) if split > 1 else None
        self.row_bindings = (("q", q, n_heads * head_dim * 4), ("positions", positions, 4), ("slots", slots, 4),
                             ("y", y, n_heads * head_dim * 4))
        self.store = None if k is None else Rope(device, k, k, positions, n_heads=n_kv_heads, head_dim=head_dim,
                                                 n_rot=0, base=1.0, scale=1.0, neox=True, kv=(self, v, slots))

    def dispatches(self, n: int) -> list[Dispatch]:
        _check_rows(self.label, n, *self.row_bindings)
        n_split, kernels = self.split if self.split and n <= self.tuning.attn_split_max_t else self.direct
        stored = self.store.dispatches(n) if self.store else []
        return [*stored, *((pipe, bg, (n_split, n, self.blocks)) for pipe, bg in kernels)]

    def kv_at(self, slot: int) -> tuple[KvGroup, int]:
        """The slot group that holds `slot`, and the slot's index in it."""
        group = next(g for g in self.kv_groups if g.slot0 <= slot < g.slot0 + g.n_slots)
        return group, slot - group.slot0


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
SAMPLING_STEP_WORD = 4  # the step counter's word in a row (the last)


class MaskLogits(_Op):
    """Tokens a grammar forbids set to -inf in place, per logit row, before the Sampler: `masks`
    holds `mask_rows` (an int32 mask index per row, -1: none) and the masks (`pack_masks`)."""

    def __init__(self, device: Device, logits: Binding, masks: Binding, *, n_vocab: int, max_rows: int,
                 tuning: Tuning | None = None) -> None:
        wg = (tuning or tuning_for(device)).wg
        pipe = compose.pipeline(device, ("mask_logits.wgsl",), dict(V=n_vocab, W=_groups(n_vocab, 32), R_CAP=max_rows,
                                                                    WG=wg), label="mask logits")
        self.label = "mask logits"
        self.steps = [(pipe, device.create_bind_group(pipe, [logits, masks]), (_groups(n_vocab, wg), 1))]
        self.row_bindings = (("logits", logits, n_vocab * 4),)


def mask_bytes(n_vocab: int, max_rows: int, max_masks: int) -> int:
    """The size of MaskLogits' `masks` buffer: room for `max_masks` masks."""
    return 4 * (max_rows + max_masks * _groups(n_vocab, 32))


def pack_masks(masks: Sequence[np.ndarray | None], max_rows: int) -> bytes:
    """MaskLogits' buffer contents for one step: bool masks (True: allowed) per logit row, or None."""
    index = np.full(max_rows, -1, np.int32)
    words = []
    for row, mask in enumerate(masks):
        if mask is not None:
            index[row] = len(words)
            words.append(np.packbits(mask, bitorder="little"))
    packed = [np.pad(w, (0, -len(w) % 4)) for w in words]
    return index.tobytes() + b"".join(w.tobytes() for w in packed)


class NextStep(_Op):
    """A decode step's sampled ids made the next step's tokens on the device (positions and the
    sampler's step counters + 1), each step's ids kept in its row of `history` [steps, stride]:
    `steps[i]` is the dispatch after step i of a multi-step submit."""

    def __init__(self, device: Device, inputs: Binding, offsets: dict[str, int], sampled: Binding,
                 history: Binding, *, stride: int, steps: int) -> None:
        words = {name: offsets[name] // 4 for name in ("tokens", "positions", "sampling")}
        pipe = compose.pipeline(device, ("next_step.wgsl",), dict(
            TOKENS=words["tokens"], POSITIONS=words["positions"], SAMPLING=words["sampling"],
            PARAM_WORDS=SAMPLING_ROW_BYTES // 4, STEP_WORD=SAMPLING_STEP_WORD), label="next step")
        self.label = "next step"
        buf = history[0]
        self.per_step = [(pipe, device.create_bind_group(pipe, [inputs, sampled, (buf, i * stride, stride)]), (1, 1))
                         for i in range(steps)]
        self.row_bindings = (("history", (buf, 0, stride), 4),)

    def dispatches_after(self, step: int, n: int) -> list[Dispatch]:
        _check_rows(self.label, n, *self.row_bindings)
        pipe, bg, (gx, gz) = self.per_step[step]
        return [(pipe, bg, (gx, n, gz))]


class Sampler(_Op):
    """Token ids [R] from logits [R, n_vocab] on the GPU: sampling.sample's rules with top_k capped
    at TOP_K_CAP (top_k 0 or larger means TOP_K_CAP). `params` holds `pack_sampling` rows; the
    host reads back `tokens` (int32 [R])."""

    def __init__(self, device: Device, logits: Binding, params: Binding, tokens: Binding, *,
                 n_vocab: int, tuning: Tuning | None = None) -> None:
        wg = (tuning or tuning_for(device)).sample_wg
        if n_vocab < TOP_K_CAP or wg < TOP_K_CAP:
            raise ValueError(f"sample: a vocabulary of {n_vocab} or a workgroup of {wg} is smaller than the "
                             f"candidate cap {TOP_K_CAP}")
        # Stage 1 keeps k of every chunk, stage 2 ranks NB * k: chunks of ~sqrt(V * CAP) logits
        # balance the two (4096 for a 262,144-token vocabulary).
        per_thread = 4 * _groups(math.isqrt(n_vocab * TOP_K_CAP), 4 * wg)
        n_chunks = _groups(n_vocab, wg * per_thread)
        max_rows = logits[2] // (4 * n_vocab)
        cand_bytes = max(1, max_rows) * n_chunks * TOP_K_CAP * 8
        cand = (device.create_buffer(cand_bytes, STORAGE_RW, "sampling candidates"), 0, cand_bytes)
        consts = dict(V=n_vocab, CAP=TOP_K_CAP, NB=n_chunks, WG=wg)
        bindings = [logits, params, cand, tokens]
        per_thread_2 = 4 * _groups(n_chunks * TOP_K_CAP, 4 * wg)
        self.label = "sample"
        self.steps = []
        for stage, e, grid_x in ((1, per_thread, n_chunks), (2, per_thread_2, 1)):
            pipe = compose.pipeline(device, ("sample.wgsl",), dict(consts, E=e, STAGE=stage),
                                    label=f"sample stage {stage}")
            self.steps.append((pipe, device.create_bind_group(pipe, bindings), (grid_x, 1)))
        self.row_bindings = (("logits", logits, n_vocab * 4), ("params", params, SAMPLING_ROW_BYTES),
                             ("tokens", tokens, 4))
