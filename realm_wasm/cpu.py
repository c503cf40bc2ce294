"""The numpy executor: runs a Plan on the CPU. The test oracle and the fallback without WebGPU.

Weights are dequantized to float32 once at load, except
- those of the types a `QuantizedMatmul` kernel takes, when the executor is given one (inside
  Pyodide: realm_wasm/wasm_kernels.py): they stay in their GGML bytes and the kernel multiplies
  them as they are (rounding x to 8 bits per block, as llama.cpp does);
- those larger than `eager_limit` bytes of float32 (inside Pyodide the 671 MB float32 embedding
  table of the default model would crowd the wasm heap): they stay quantized and are dequantized
  a chunk of rows at a time when used.
All other math is float32. LoRA adapters (`lora.py`) are added beside the weights, per token,
never merged.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Protocol

import numpy as np

from .gguf import TensorInfo
from .lora import Adapter, add_side_paths, check_batch
from .plan import Batch, Op, Plan, head_input
from .quants import dequantize
from .sampling import SamplingParams, sample

WeightSource = Callable[[TensorInfo], np.ndarray]  # raw tensor bytes (uint8) for a tensor


class KVCache:
    """Per layer, per slot, per position: the keys and values of every token seen so far.

    Stored as float16, as llama.cpp and the GPU executors store them (half the memory and bandwidth);
    attention computes in float32.
    """

    def __init__(self, plan: Plan, n_slots: int, n_ctx: int) -> None:
        kv = plan.kv
        shape = (kv.n_layers, n_slots, n_ctx, kv.n_kv_heads * kv.head_dim)
        self.k = np.zeros(shape, np.float16)
        self.v = np.zeros(shape, np.float16)
        self.n_slots, self.n_ctx = n_slots, n_ctx


def gelu(x: np.ndarray) -> np.ndarray:
    # tanh approximation, as llama.cpp's ggml_gelu
    return 0.5 * x * (1.0 + np.tanh(np.float32(0.7978845608) * (x + np.float32(0.044715) * x * x * x)))


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


ACTIVATIONS = {"gelu": gelu, "silu": silu}


def softcap(x: np.ndarray, cap: float) -> np.ndarray:
    """cap · tanh(x / cap): x squashed smoothly into (-cap, cap) (gemma2's attention and logits)."""
    return np.float32(cap) * np.tanh(x / np.float32(cap))


class QuantizedMatmul(Protocol):
    """A kernel that multiplies straight from a weight's GGML bytes (wasm_kernels.WasmMatmul)."""

    def supports(self, type_id: int) -> bool: ...

    def matmul_t(self, x: np.ndarray, raw: np.ndarray, t: TensorInfo) -> np.ndarray:
        """x [T, K] float32 @ Wᵀ -> [T, rows] float32, for W [rows, K] in its bytes raw [rows, row bytes]."""


class QuantizedWeight:
    """A [rows, K] weight kept in its GGML bytes; rows are dequantized when needed, and products go
    to `kernel` when there is one."""

    CHUNK_ROWS = 8192

    def __init__(self, raw: np.ndarray, t: TensorInfo, kernel: QuantizedMatmul | None = None) -> None:
        self.raw, self.t, self.kernel = np.asarray(raw).reshape(t.shape[0], -1), t, kernel

    def rows(self, idx: np.ndarray) -> np.ndarray:
        return dequantize(self.raw[idx], self.t.type_id, (len(idx), self.t.shape[1]))

    def matmul_t(self, x: np.ndarray) -> np.ndarray:
        """x @ Wᵀ: by the kernel, or dequantizing CHUNK_ROWS rows of W at a time."""
        if self.kernel is not None:
            return self.kernel.matmul_t(x, self.raw, self.t)
        out = np.empty((len(x), self.t.shape[0]), np.float32)
        for r in range(0, self.t.shape[0], self.CHUNK_ROWS):
            out[:, r:r + self.CHUNK_ROWS] = x @ self.rows(np.arange(r, min(r + self.CHUNK_ROWS, len(self.raw)))).T
        return out


def take_rows(w: np.ndarray | QuantizedWeight, idx: np.ndarray) -> np.ndarray:
    return w.rows(idx) if isinstance(w, QuantizedWeight) else w[idx]


def matmul_t(x: np.ndarray, w: np.ndarray | QuantizedWeight) -> np.ndarray:
    return w.matmul_t(x) if isinstance(w, QuantizedWeight) else x @ w.T


def rope_angles(positions: np.ndarray, p: dict, freq_factors: np.ndarray | None) -> np.ndarray:
    """theta[t, i] = position[t] * scale * base^(-2i / n_rot) / freq_factor[i]."""
    n_rot = p["n_rot"]
    inv = p["base"] ** (-np.arange(0, n_rot, 2, dtype=np.float64) / n_rot)
    if freq_factors is not None:
        inv = inv / freq_factors[: n_rot // 2]
    return (positions[:, None].astype(np.float64) * p["scale"]) * inv[None, :]


def apply_rope(x: np.ndarray, positions: np.ndarray, p: dict, freq_factors: np.ndarray | None) -> np.ndarray:
    """Rotate pairs of each head's first n_rot dims: (i, i + n_rot/2) in NeoX layout, (2i, 2i+1) else."""
    t = len(x)
    heads = x.reshape(t, p["n_heads"], p["head_dim"])
    theta = rope_angles(positions, p, freq_factors)
    cos = np.cos(theta).astype(np.float32)[:, None, :]
    sin = np.sin(theta).astype(np.float32)[:, None, :]
    n_rot, half = p["n_rot"], p["n_rot"] // 2
    rot = heads[..., :n_rot]
    a, b = (rot[..., :half], rot[..., half:]) if p["neox"] else (rot[..., 0::2], rot[..., 1::2])
    ra, rb = a * cos - b * sin, a * sin + b * cos
    out = heads.copy()
    if p["neox"]:
        out[..., :half], out[..., half:n_rot] = ra, rb
    else:
        out[..., 0:n_rot:2], out[..., 1:n_rot:2] = ra, rb
    return out.reshape(t, -1)


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, batch: Batch, cache: KVCache, p: dict) -> np.ndarray:
    """Store this step's keys/values, then attend each token to its own sequence's past."""
    layer, nh, nkv, hd = p["layer"], p["n_heads"], p["n_kv_heads"], p["head_dim"]
    cache.k[layer, batch.slots, batch.positions] = k
    cache.v[layer, batch.slots, batch.positions] = v
    out = np.empty((len(q), nh * hd), np.float32)
    group = nh // nkv  # query heads sharing one KV head (GQA)
    for slot in np.unique(batch.slots):
        rows = np.nonzero(batch.slots == slot)[0]
        pos = batch.positions[rows]
        n_keys = int(pos.max()) + 1
        keys = cache.k[layer, slot, :n_keys].astype(np.float32).reshape(n_keys, nkv, hd)
        vals = cache.v[layer, slot, :n_keys].astype(np.float32).reshape(n_keys, nkv, hd)
        qh = q[rows].reshape(len(rows), nkv, group, hd)
        scores = np.einsum("tkgd,skd->kgts", qh, keys) * np.float32(p["scale"])
        if p.get("softcap"):
            scores = softcap(scores, p["softcap"])
        j = np.arange(n_keys)[None, :]
        allowed = j <= pos[:, None]
        if p["window"]:
            allowed &= pos[:, None] - j < p["window"]
        scores = np.where(allowed, scores, -np.inf)
        scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
        scores /= scores.sum(axis=-1, keepdims=True)
        out[rows] = np.einsum("kgts,skd->tkgd", scores, vals).reshape(len(rows), nh * hd)
    return out


class CpuExecutor:
    """Runs a Plan with numpy. `forward(batch)` returns logits [R, n_vocab]. Holds up to
    `max_adapters` LoRA adapters (`set_adapter`), which a batch's tokens apply by slot."""

    name = "numpy"
    max_logit_rows = 1 << 20
    run_ahead = 0  # runs each step when submitted
    steps_per_submit = 1  # nothing queues: each submit runs at once, so one step each
    # numpy's BLAS may sum a row differently with T (float noise only: x is never rounded to int8)
    exact_rows = 1 << 20

    def __init__(self, plan: Plan, weight_bytes: WeightSource, n_slots: int = 1, n_ctx: int = 2048,
                 eager_limit: int | None = None, kernel: QuantizedMatmul | None = None,
                 max_adapters: int = 0) -> None:
        self.plan, self.kernel = plan, kernel
        self.max_adapters = max_adapters
        self.adapters: dict[int, Adapter] = {}

        def keep(t: TensorInfo) -> np.ndarray | QuantizedWeight:
            if kernel is not None and kernel.supports(t.type_id):
                return QuantizedWeight(weight_bytes(t), t, kernel)
            if eager_limit is not None and 4 * int(np.prod(t.shape)) > eager_limit:
                return QuantizedWeight(weight_bytes(t), t)
            return dequantize(weight_bytes(t), t.type_id, t.shape)

        self.w = {name: keep(t) for name, t in plan.weights.items()}
        self.cache = KVCache(plan, n_slots, n_ctx)
        self.n_slots = n_slots

    def set_adapter(self, slot: int, adapter: Adapter) -> None:
        if not 0 <= slot < self.max_adapters:
            raise ValueError(f"adapter slot {slot} out of range 0..{self.max_adapters - 1}")
        self.adapters[slot] = adapter

    def clear_adapter(self, slot: int) -> None:
        self.adapters.pop(slot, None)

    def forward(self, batch: Batch, until: str = "logits") -> np.ndarray:
        if len(batch) == 0:
            raise ValueError("empty batch")
        if int(batch.positions.max()) >= self.cache.n_ctx:
            raise ValueError(f"position {int(batch.positions.max())} is past the context ({self.cache.n_ctx})")
        check_batch(batch, self.adapters)
        buf: dict[str, np.ndarray] = {"tokens": batch.tokens}
        for op in self.plan.ops:
            if op.out == "logits" and until != "logits":
                return buf[until]
            buf[op.out] = self._run(op, buf, batch)
        return buf["logits"]

    def hidden(self, batch: Batch) -> np.ndarray:
        """The final hidden state [R, n_embd] of the batch's logit rows: the output head's input."""
        return self.forward(batch, until=head_input(self.plan))

    def copy_kv(self, src: int, dst: int, n_tokens: int) -> None:
        for cache in (self.cache.k, self.cache.v):
            cache[:, dst, :n_tokens] = cache[:, src, :n_tokens]

    def forward_sample(self, batch: Batch, rows: Sequence[tuple[SamplingParams, int]]) -> list[int]:
        self.last_sampled = [sample(logits, params, step)
                             for logits, (params, step) in zip(self.forward(batch), rows, strict=True)]
        return self.last_sampled

    def submit_sample(self, batch: Batch, rows: Sequence[tuple[SamplingParams, int]], follow: bool = False,
                      masks: Sequence[np.ndarray | None] | None = None, steps: int = 1) -> Future:
        """`forward_sample`, done at once (the GPU executor queues); `follow` feeds the last sampled ids;
        `masks`: per row, the tokens it may sample (bool [n_vocab]) or None; `steps`: that many decode
        steps, each fed the ids the one before sampled (their ids step by step)."""
        if steps > 1 and any(m is not None for m in masks or ()):
            raise ValueError("a grammar's masks hold for one step: a submit of several steps takes none")
        if follow:
            batch = dataclasses.replace(batch, tokens=np.array(self.last_sampled, np.int32))
        ids = []
        for i in range(steps):
            if i:  # the next decode step: row r is token r
                batch = dataclasses.replace(batch, tokens=np.array(self.last_sampled, np.int32),
                                            positions=batch.positions + 1)
                rows = [(params, step + 1) for params, step in rows]
            logits = self.forward(batch)
            for row, mask in enumerate(masks or ()):
                if mask is not None:
                    logits[row] = np.where(mask, logits[row], np.float32(-np.inf))
            self.last_sampled = [sample(z, params, step) for z, (params, step) in zip(logits, rows, strict=True)]
            ids += self.last_sampled
        done = Future()
        done.set_result(ids)
        return done

    def _run(self, op: Op, buf: dict[str, np.ndarray], batch: Batch) -> np.ndarray:
        x = buf[op.ins[0]] if op.ins else None
        w = [self.w[name] for name in op.weights]
        p = op.params
        match op.kind:
            case "embed":
                return take_rows(w[0], x) * np.float32(p["scale"])
            case "rmsnorm":
                g = x.reshape(len(x), -1, p["group"])
                ms = np.mean(g * g, axis=-1, keepdims=True)
                return (g / np.sqrt(ms + np.float32(p["eps"])) * w[0].reshape(-1, p["group"])).reshape(x.shape)
            case "matmul":
                return self._project(x, op.weights[0], batch)
            case "glu":
                return ACTIVATIONS[p["act"]](self._project(x, op.weights[0], batch)) * self._project(x, op.weights[1],
                                                                                                   batch)
            case "rope":
                return apply_rope(x, batch.positions, p, w[0] if w else None)
            case "attention":
                return attention(x, buf[op.ins[1]], buf[op.ins[2]], batch, self.cache, p)
            case "bias":
                return x + w[0]
            case "softcap":
                return softcap(x, p["cap"])
            case "add":
                return x + buf[op.ins[1]]
            case "gather":
                return x[batch.logit_rows]
        raise ValueError(f"cpu executor has no op {op.kind!r}")

    def _project(self, x: np.ndarray, weight: str, batch: Batch) -> np.ndarray:
        """x @ Wᵀ plus the LoRA side paths of the tokens' adapters (adapters adapt only weights whose
        rows are the step's tokens, `lora.adaptable_weights`: never the output head's logit rows)."""
        y = matmul_t(x, self.w[weight])
        if self.adapters:
            add_side_paths(y, x, weight, batch, self.adapters)
        return y
