"""Runs a Plan on a WebGPU device: wgpu-py natively, js.navigator.gpu in the browser.

At load: weights go to the device once (in their GGML bytes), every op becomes a kernel object with
its pipelines and bind groups built (`ops.py`, `matmul.py`). Per step: the step's inputs (a few
int32 per token) are written, one command buffer with every dispatch is submitted, and either the
logits or only the sampled token ids are read back.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from ..gguf import TensorInfo
from ..plan import STEP_INPUTS, Batch, Op, Plan
from ..sampling import SamplingParams
from .device import COPY_DST, STORAGE, STORAGE_RW, UNIFORM_RW, Binding, Device, Dispatch
from .matmul import GpuWeight, QuantMatmul
from .ops import SAMPLING_ROW_BYTES, Add, Attention, Embed, Gather, Glu, RmsNorm, Rope, Sampler, pack_sampling
from .weights import FileWeights, StreamedWeights

WeightStore = FileWeights | StreamedWeights
DEFAULT_MAX_TOKENS = 256  # rows per step the activation buffers hold (Engine's prefill chunk)


class Launch:
    """Some dispatches run for each of a step's rows of one kind ("T" tokens or "R" logit rows)."""

    def __init__(self, rows: str, *kernels) -> None:
        self.rows, self.kernels = rows, kernels

    def dispatches(self, counts: dict[str, int]) -> list[Dispatch]:
        return [d for k in self.kernels for d in k.dispatches(counts[self.rows])]


class GpuExecutor:
    """`forward(batch)` -> logits [R, n_vocab]; `forward_sample(batch, rows)` -> sampled ids [R]."""

    name = "wgpu"

    def __init__(self, plan: Plan, weights: Callable[[TensorInfo], np.ndarray] | WeightStore, n_slots: int = 1,
                 n_ctx: int = 2048, device: Device | None = None, max_tokens: int = DEFAULT_MAX_TOKENS) -> None:
        if device is None:
            from .native import NativeDevice  # CPython only; the browser passes its own device

            device = NativeDevice.create()
        self.device, self.plan, self.n_slots, self.n_ctx = device, plan, n_slots, n_ctx
        # a callable gives a tensor's bytes (a GGUF file); a store was filled some other way (a stream)
        self.store = FileWeights(device, weights) if callable(weights) else weights
        # logits [R, n_vocab] must fit one storage binding (128 MiB on some adapters: 128 rows of 262,144)
        max_rows = device.limits["max_storage_buffer_binding_size"] // (4 * plan.n_vocab)
        self.capacity = {"T": max_tokens, "R": min(max_tokens, max_rows)}
        self.max_logit_rows = self.capacity["R"]
        self.kv_f16 = "shader-f16" in device.features  # as llama.cpp and the numpy executor store it
        self.vectors: dict[str, Binding] = {}

        self.inputs = {name: self.buffer(4 * self.capacity["R" if name == "logit_rows" else "T"], name)
                       for name in STEP_INPUTS}
        # matmul kernels read their row count from a uniform (x of a vec4<u32>)
        self.counts = {rows: (device.create_buffer(16, UNIFORM_RW, f"{rows} count"), 0, 16) for rows in "TR"}
        self.acts = {name: self.buffer(4 * width * self.capacity[rows], name)
                     for name, (rows, width) in plan.buffers.items()}
        self.launches = [BUILDERS[op.kind](self, op) for op in plan.ops]

        n_vocab, r_max = plan.n_vocab, self.capacity["R"]
        self.sampling_params = self.buffer(SAMPLING_ROW_BYTES * r_max, "sampling params")
        self.sampled = self.buffer(4 * r_max, "sampled ids")
        self.sampler = Launch("R", Sampler(device, self.acts["logits"], self.sampling_params, self.sampled,
                                           n_vocab=n_vocab))

    # -- load time -------------------------------------------------------------------------------

    def buffer(self, size: int, label: str) -> Binding:
        return (self.device.create_buffer(max(size, 16), STORAGE_RW, label), 0, max(size, 16))

    def weight(self, name: str) -> GpuWeight:
        """A matrix in its GGML bytes on the device (the tied embedding serves embed and head)."""
        return self.store.matrix(self.plan.weights[name])

    def host_vector(self, name: str) -> np.ndarray:
        return self.store.vector(self.plan.weights[name])

    def vector(self, name: str) -> Binding:
        """A small float32 vector (norm weights), dequantized on the host."""
        if name not in self.vectors:
            data = self.host_vector(name).astype(np.float32)
            buf = self.device.create_buffer(data.nbytes, STORAGE | COPY_DST, name)
            self.device.write_buffer(buf, 0, data.tobytes())
            self.vectors[name] = (buf, 0, data.nbytes)
        return self.vectors[name]

    def rows_of(self, op: Op) -> str:
        return self.plan.buffers[op.out][0]

    def width(self, name: str) -> int:
        return self.plan.buffers[name][1]

    # -- per step --------------------------------------------------------------------------------

    def _write_step(self, batch: Batch) -> dict[str, int]:
        counts = {"T": len(batch), "R": len(batch.logit_rows)}
        for rows, n in counts.items():
            if not 0 < n <= self.capacity[rows]:
                what = "tokens" if rows == "T" else "logit rows"
                raise ValueError(f"a step of {n} {what} (1..{self.capacity[rows]} allowed)")
        if int(batch.positions.max()) >= self.n_ctx:
            raise ValueError(f"position {int(batch.positions.max())} is past the context ({self.n_ctx})")
        if int(batch.slots.max()) >= self.n_slots or int(batch.slots.min()) < 0:
            raise ValueError(f"slot out of range 0..{self.n_slots - 1}")
        if int(batch.logit_rows.max()) >= counts["T"]:
            raise ValueError("a logit row past the step's tokens")
        for name in STEP_INPUTS:
            self.device.write_buffer(self.inputs[name][0], 0, np.ascontiguousarray(getattr(batch, name), np.int32))
        for rows, n in counts.items():
            self.device.write_buffer(self.counts[rows][0], 0, np.array([n, 0, 0, 0], np.uint32).tobytes())
        return counts

    def _dispatches(self, counts: dict[str, int]) -> list[Dispatch]:
        return [d for launch in self.launches for d in launch.dispatches(counts)]

    def forward(self, batch: Batch) -> np.ndarray:
        counts = self._write_step(batch)
        self.device.submit(self._dispatches(counts))
        raw = self.device.read_buffer(self.acts["logits"][0], 0, 4 * counts["R"] * self.plan.n_vocab)
        return np.frombuffer(raw, np.float32).reshape(counts["R"], self.plan.n_vocab)

    def forward_sample(self, batch: Batch, rows: Sequence[tuple[SamplingParams, int]]) -> list[int]:
        """One step whose logit rows are sampled on the device: only R token ids come back."""
        counts = self._write_step(batch)
        if len(rows) != counts["R"]:
            raise ValueError(f"{len(rows)} sampling rows for {counts['R']} logit rows")
        self.device.write_buffer(self.sampling_params[0], 0, pack_sampling(rows))
        self.device.submit(self._dispatches(counts) + self.sampler.dispatches(counts))
        return np.frombuffer(self.device.read_buffer(self.sampled[0], 0, 4 * counts["R"]), np.int32).tolist()


# One builder per op kind: the plan's op -> its kernels on the device.


def _embed(ex: GpuExecutor, op: Op) -> Launch:
    return Launch("T", Embed(ex.device, ex.weight(op.weights[0]), ex.inputs["tokens"], ex.acts[op.out],
                             scale=op.params["scale"]))


def _rmsnorm(ex: GpuExecutor, op: Op) -> Launch:
    return Launch(ex.rows_of(op), RmsNorm(ex.device, ex.acts[op.ins[0]], ex.vector(op.weights[0]), ex.acts[op.out],
                                          width=ex.width(op.out), group=op.params["group"], eps=op.params["eps"]))


def _matmul(ex: GpuExecutor, op: Op) -> Launch:
    rows = ex.rows_of(op)
    return Launch(rows, QuantMatmul(ex.device, ex.weight(op.weights[0]), ex.acts[op.ins[0]], ex.acts[op.out],
                                    ex.counts[rows]))


def _glu(ex: GpuExecutor, op: Op) -> Launch:
    width = ex.width(op.out)
    gate, up = (ex.buffer(4 * width * ex.capacity["T"], f"{op.out} {part}") for part in ("gate", "up"))
    x, rows = ex.acts[op.ins[0]], ex.counts["T"]
    return Launch("T", QuantMatmul(ex.device, ex.weight(op.weights[0]), x, gate, rows),
                  QuantMatmul(ex.device, ex.weight(op.weights[1]), x, up, rows),
                  Glu(ex.device, gate, up, ex.acts[op.out], width=width, act=op.params["act"]))


def _rope(ex: GpuExecutor, op: Op) -> Launch:
    p = op.params
    freqs = ex.host_vector(op.weights[0]) if op.weights else None
    return Launch("T", Rope(ex.device, ex.acts[op.ins[0]], ex.acts[op.out], ex.inputs["positions"],
                            n_heads=p["n_heads"], head_dim=p["head_dim"], n_rot=p["n_rot"], base=p["base"],
                            scale=p["scale"], neox=p["neox"], freq_factors=freqs))


def _attention(ex: GpuExecutor, op: Op) -> Launch:
    p = op.params
    q, k, v = (ex.acts[name] for name in op.ins)
    return Launch("T", Attention(ex.device, q, k, v, ex.inputs["positions"], ex.inputs["slots"], ex.acts[op.out],
                                 n_heads=p["n_heads"], n_kv_heads=p["n_kv_heads"], head_dim=p["head_dim"],
                                 n_ctx=ex.n_ctx, n_slots=ex.n_slots, window=p["window"], scale=p["scale"],
                                 kv_f16=ex.kv_f16, label=f"attention {p['layer']}"))


def _add(ex: GpuExecutor, op: Op) -> Launch:
    a, b = (ex.acts[name] for name in op.ins)
    return Launch(ex.rows_of(op), Add(ex.device, a, b, ex.acts[op.out], width=ex.width(op.out)))


def _gather(ex: GpuExecutor, op: Op) -> Launch:
    return Launch("R", Gather(ex.device, ex.acts[op.ins[0]], ex.inputs["logit_rows"], ex.acts[op.out],
                              width=ex.width(op.out)))


BUILDERS: dict[str, Callable[[GpuExecutor, Op], Launch]] = {
    "embed": _embed, "rmsnorm": _rmsnorm, "matmul": _matmul, "glu": _glu, "rope": _rope,
    "attention": _attention, "add": _add, "gather": _gather,
}
