"""Runs a Plan on a WebGPU device: wgpu-py natively, js.navigator.gpu in the browser.

At load: weights go to the device once (in their GGML bytes), every op becomes a kernel object with
its pipelines and bind groups built (`ops.py`, `matmul.py`). Per step: the step's inputs (a few
int32 per token) are written, one command buffer with every dispatch is submitted, and either the
logits or only the sampled token ids are read back.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from ..gguf import TensorInfo
from ..plan import STEP_INPUTS, Batch, Op, Plan
from ..sampling import SamplingParams
from .device import COPY_DST, STORAGE, STORAGE_RW, UNIFORM_RW, Binding, Device, Dispatch, ReadBack
from .matmul import GpuWeight, QuantMatmul, ResidualNorm, concat_rows
from .ops import (
    SAMPLING_ROW_BYTES,
    Add,
    Attention,
    Embed,
    Gather,
    Glu,
    RmsNorm,
    Rope,
    RopeHeads,
    Sampler,
    pack_sampling,
    scratch,
)
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
    """`forward(batch)` -> logits [R, n_vocab]; `forward_sample(batch, rows)` -> sampled ids [R];
    `submit_sample` queues a sampled step and returns at once."""

    name = "webgpu"
    queues_ahead = True  # submit_sample returns once the step is queued

    def __init__(self, plan: Plan, weights: Callable[[TensorInfo], np.ndarray] | WeightStore, *, device: Device,
                 n_slots: int = 1, n_ctx: int = 2048, max_tokens: int = DEFAULT_MAX_TOKENS,
                 max_logit_rows: int | None = None) -> None:
        self.device, self.plan, self.n_slots, self.n_ctx = device, plan, n_slots, n_ctx
        # a callable gives a tensor's bytes (a GGUF file); a store was filled some other way (a stream)
        self.store = FileWeights(device, weights) if callable(weights) else weights
        # logits [R, n_vocab] must fit one storage binding (128 MiB on some adapters: 128 rows of 262,144);
        # a decoder that never asks for all-position logits needs only a row per sequence
        max_rows = device.limits["max_storage_buffer_binding_size"] // (4 * plan.n_vocab)
        self.capacity = {"T": max_tokens, "R": min(max_tokens, max_rows, max_logit_rows or max_tokens)}
        self.max_logit_rows = self.capacity["R"]
        self.kv_f16 = "shader-f16" in device.features  # as llama.cpp and the numpy executor store it
        self.vectors: dict[str, Binding] = {}

        self.inputs = {name: self.buffer(4 * self.capacity["R" if name == "logit_rows" else "T"], name)
                       for name in STEP_INPUTS}
        # matmul kernels read their row count from a uniform (x of a vec4<u32>)
        self.counts = {rows: (device.create_buffer(16, UNIFORM_RW, f"{rows} count"), 0, 16) for rows in "TR"}
        self.acts = {name: self.buffer(4 * width * self.capacity[rows], name)
                     for name, (rows, width) in plan.buffers.items()}
        self.joined = joined_matmuls(plan)
        for first, second in {(plan.ops[i].out, plan.ops[j].out) for i, j in self.joined.items()}:
            self._colocate(first, second)  # a joined pair's outputs: two regions of one buffer
        self.launches = build_launches(self)

        n_vocab, r_max = plan.n_vocab, self.capacity["R"]
        self.sampling_params = self.buffer(SAMPLING_ROW_BYTES * r_max, "sampling params")
        self.sampled = self.buffer(4 * r_max, "sampled ids")
        self.sampler = Launch("R", Sampler(device, self.acts["logits"], self.sampling_params, self.sampled,
                                           n_vocab=n_vocab))
        self._step_dispatches: dict[tuple[int, int, bool], list[Dispatch]] = {}
        self._last_sampled_rows = 0  # logit rows of the last sampled step (what a follow-up step reads)

    # -- load time -------------------------------------------------------------------------------

    def buffer(self, size: int, label: str) -> Binding:
        return (self.device.create_buffer(max(size, 16), STORAGE_RW, label), 0, max(size, 16))

    def _colocate(self, first: str, second: str) -> None:
        """Put activation `second` right after `first` in one buffer (a joined mat-vec writes both)."""
        (_, _, size1), (_, _, size2) = self.acts[first], self.acts[second]
        align = self.device.limits.get("min_storage_buffer_offset_alignment", 256)
        at = -(-size1 // align) * align
        buf = self.device.create_buffer(at + size2, STORAGE_RW, f"{first} + {second}")
        self.acts[first], self.acts[second] = (buf, 0, size1), (buf, at, size2)

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

    def _dispatches(self, counts: dict[str, int], sample: bool = False) -> list[Dispatch]:
        """The step's dispatches, kept per shape: decode steps repeat one shape, and building the
        list (a few hundred tuples) costs as much host time as recording it."""
        key = (counts["T"], counts["R"], sample)
        if key not in self._step_dispatches:
            if len(self._step_dispatches) >= 64:  # prefill chunks of many lengths: keep it bounded
                self._step_dispatches.clear()
            launches = self.launches + ([self.sampler] if sample else [])
            self._step_dispatches[key] = [d for launch in launches for d in launch.dispatches(counts)]
        return self._step_dispatches[key]

    def forward(self, batch: Batch) -> np.ndarray:
        counts = self._write_step(batch)
        logits = (self.acts["logits"][0], 0, 4 * counts["R"] * self.plan.n_vocab)
        raw = self.device.submit(self._dispatches(counts), read=logits).result()
        return np.frombuffer(raw, np.float32).reshape(counts["R"], self.plan.n_vocab)

    def forward_sample(self, batch: Batch, rows: Sequence[tuple[SamplingParams, int]]) -> list[int]:
        """One step whose logit rows are sampled on the device: only R token ids come back."""
        return self.submit_sample(batch, rows).result()

    def submit_sample(self, batch: Batch, rows: Sequence[tuple[SamplingParams, int]],
                      follow: bool = False) -> SampledIds:
        """Queue a sampled step without waiting for it. With `follow`, the step's tokens are the
        ids the previous submitted step sampled (its logit row r feeds token r; batch.tokens is
        ignored): the GPU copies them, so step n + 1 can be queued before step n's ids are read."""
        counts = self._write_step(batch)
        if len(rows) != counts["R"]:
            raise ValueError(f"{len(rows)} sampling rows for {counts['R']} logit rows")
        self.device.write_buffer(self.sampling_params[0], 0, pack_sampling(rows))
        copies = []
        if follow:
            if self._last_sampled_rows != counts["T"]:
                raise ValueError(f"a follow-up step of {counts['T']} tokens after a step that sampled "
                                 f"{self._last_sampled_rows}")
            size = 4 * counts["T"]
            copies = [((self.sampled[0], 0, size), (self.inputs["tokens"][0], 0, size))]
        self._last_sampled_rows = counts["R"]
        read = self.device.submit(self._dispatches(counts, sample=True), copies=copies,
                                  read=(self.sampled[0], 0, 4 * counts["R"]))
        return SampledIds(read)


class SampledIds:
    """Token ids a queued step samples; `result()` waits for them."""

    def __init__(self, read: ReadBack) -> None:
        self.read = read

    def result(self) -> list[int]:
        return np.frombuffer(self.read.result(), np.int32).tolist()


# One builder per op kind: the plan's op -> its kernels on the device. A dispatch costs a few µs
# however small, so `fusions` first merges neighbouring ops into fused kernels:
#   rmsnorm(B, per head) ... rope(B)              -> Rope(norm=)             (Q/K norm + RoPE)
#   rope(k) ... attention(q, k, v)                -> Rope(kv=) stores k and v  (+ KV-cache store)
#   rope(q) ... rope(k), same angles              -> Rope(also=) at rope(k)  (q and k in one dispatch)
#   rmsnorm(o) ; add(x, o) -> x [; rmsnorm(x)->h] -> RmsNorm(residual=, then=) (post-norm + add + next norm)


@dataclass
class Fusions:
    rope_norm: dict[int, Op]  # rope index -> the per-head rmsnorm folded into it
    rope_store: dict[int, int]  # rope (of k) index -> attention index whose KV store it does
    rope_pair: dict[int, int]  # rope index -> an earlier rope (of q) done in the same dispatch
    residual: dict[int, tuple[Op, Op | None]]  # post-norm index -> (its add, the next pre-norm or None)
    matmul_norm: dict[int, int]  # matmul index -> the residual post-norm of its output, done by its kernel
    skipped: set[int]  # ops done inside another op's kernel


def fusions(ops: list[Op]) -> Fusions:
    f = Fusions({}, {}, {}, {}, {}, set())

    def untouched(buf: str, lo: int, hi: int) -> bool:
        return all(buf not in (*ops[j].ins, ops[j].out) for j in range(lo + 1, hi))

    for i, op in enumerate(ops):
        if op.kind == "rope" and not op.weights:
            b = op.out
            norms = [j for j in range(i) if ops[j].kind == "rmsnorm" and ops[j].ins[0] == ops[j].out == b
                     and ops[j].params["group"] == op.params["head_dim"] and untouched(b, j, i)]
            if norms:
                f.rope_norm[i] = ops[norms[-1]]
                f.skipped.add(norms[-1])
        if op.kind == "attention":
            q, k, v = op.ins
            ropes = [j for j in range(i) if ops[j].kind == "rope" and ops[j].out == k and untouched(k, j, i)]
            # the rope stores v too, so v must be final by then
            if ropes and all(ops[j].out != v for j in range(ropes[-1], i)):
                f.rope_store[ropes[-1]] = i
        nxt = ops[i + 1] if i + 1 < len(ops) else None
        if (op.kind == "rmsnorm" and op.ins[0] == op.out and nxt is not None and nxt.kind == "add"
                and nxt.ins[1] == op.out and nxt.ins[0] == nxt.out
                and i not in f.skipped):
            after = ops[i + 2] if i + 2 < len(ops) else None
            then = after if (after is not None and after.kind == "rmsnorm" and after.ins[0] == nxt.out
                             and after.out != nxt.out) else None
            f.residual[i] = (nxt, then)
            f.skipped.update({i + 1} | ({i + 2} if then else set()))
            # the post-norm of the matmul just before it: that kernel's last workgroup may run it
            if i and ops[i - 1].kind == "matmul" and ops[i - 1].out == op.out:
                f.matmul_norm[i - 1] = i

    # A rope takes in the nearest earlier rope with the same angles (positions, rotation, freq
    # factors) whose buffer nothing touches until then: that one moves here, so it must not store.
    def angles(op: Op) -> tuple:
        return op.weights, {k: v for k, v in op.params.items() if k != "n_heads"}

    ropes = [i for i, op in enumerate(ops) if op.kind == "rope"]
    for i in ropes:
        earlier = [j for j in ropes if j < i and j not in f.rope_store and j not in f.rope_pair
                   and j not in f.skipped and ops[j].out != ops[i].out and angles(ops[j]) == angles(ops[i])
                   and untouched(ops[j].out, j, i)]
        if earlier:
            f.rope_pair[i] = earlier[-1]
            f.skipped.add(earlier[-1])
    return f


def joined_matmuls(plan: Plan) -> dict[int, int]:
    """matmul index -> the matmul right after it that one kernel computes with it: the same input,
    weights of one type and row length used nowhere else (a layer's q and k; v too where it
    shares their type, but a kernel joins two). Each activation pairs with one partner only."""
    ops, pairs, partner = plan.ops, {}, {}
    uses = Counter(name for op in ops for name in op.weights)
    for i, (a, b) in enumerate(zip(ops, ops[1:], strict=False)):
        if not (a.kind == b.kind == "matmul" and a.ins == b.ins and a.out != b.out and i not in pairs.values()):
            continue
        wa, wb = (plan.weights[op.weights[0]] for op in (a, b))
        if (wa.type_id, wa.dims[0]) != (wb.type_id, wb.dims[0]) or uses[wa.name] + uses[wb.name] > 2:
            continue
        if partner.get(a.out, b.out) == b.out and partner.get(b.out, a.out) == a.out:
            partner[a.out], partner[b.out] = b.out, a.out
            pairs[i] = i + 1
    return pairs


def build_launches(ex: GpuExecutor) -> list[Launch]:
    ops = ex.plan.ops
    fused = fusions(ops)
    ex.attentions = {}  # attention op index -> its kernel (a rope may build it first, to store into it)
    launches, done = [], set()
    for i, op in enumerate(ops):
        if i in fused.skipped or i in done:
            continue
        if op.kind == "matmul" and i in ex.joined:
            launch = _joined_matmul(ex, op, ops[i + 1])
            launches.append(launch or _matmul(ex, op))
            done.update({i + 1} if launch else set())
        elif op.kind == "matmul" and i in fused.matmul_norm:
            norm = fused.matmul_norm[i]
            launch = _matmul_then_norm(ex, op, ops[norm], *fused.residual[norm])
            launches.append(launch or _matmul(ex, op))
            done.update({norm} if launch else set())
        elif op.kind == "rope":
            launches.append(_rope(ex, i, fused))
        elif op.kind == "attention":
            launches.append(Launch("T", _attention_kernel(ex, i, stored=i in fused.rope_store.values())))
        elif op.kind == "rmsnorm" and i in fused.residual:
            launches.append(_residual_norm(ex, op, *fused.residual[i]))
        else:
            launches.append(BUILDERS[op.kind](ex, op))
    return launches


def _embed(ex: GpuExecutor, op: Op) -> Launch:
    return Launch("T", Embed(ex.device, ex.weight(op.weights[0]), ex.inputs["tokens"], ex.acts[op.out],
                             scale=op.params["scale"]))


def _rmsnorm(ex: GpuExecutor, op: Op) -> Launch:
    return Launch(ex.rows_of(op), RmsNorm(ex.device, ex.acts[op.ins[0]], ex.vector(op.weights[0]), ex.acts[op.out],
                                          width=ex.width(op.out), group=op.params["group"], eps=op.params["eps"]))


def _next_norm(ex: GpuExecutor, then: Op | None) -> tuple[Binding, Binding] | None:
    """(weight, output) of the pre-norm a residual norm computes next, if any."""
    return (ex.vector(then.weights[0]), ex.acts[then.out]) if then else None


def _residual_norm(ex: GpuExecutor, norm: Op, add: Op, then: Op | None) -> Launch:
    """add.out += rmsnorm(norm.in) [then then.out = rmsnorm(add.out)]: one dispatch."""
    after = _next_norm(ex, then)
    return Launch(ex.rows_of(add), RmsNorm(ex.device, ex.acts[norm.ins[0]], ex.vector(norm.weights[0]),
                                           ex.acts[add.out], width=ex.width(add.out), group=norm.params["group"],
                                           eps=norm.params["eps"], residual=True, then=after))


def _matmul(ex: GpuExecutor, op: Op) -> Launch:
    rows = ex.rows_of(op)
    return Launch(rows, QuantMatmul(ex.device, ex.weight(op.weights[0]), ex.acts[op.ins[0]], ex.acts[op.out],
                                    ex.counts[rows]))


def _joined_weight(ex: GpuExecutor, first: str, second: str) -> GpuWeight | None:
    """Weights `first` and `second` as one, rows of one then the other, copied on the device (the
    originals are freed: the joined copy is all the kernels read), or None where they cannot be
    joined (`concat_rows`)."""
    joined = concat_rows(ex.device, ex.weight(first), ex.weight(second), label=f"{first} + {second}")
    if joined is not None:
        for name in (first, second):
            ex.store.release(ex.plan.weights[name])
    return joined


def _joined_matmul(ex: GpuExecutor, op: Op, other: Op) -> Launch | None:
    """Two matmuls of one input (q and k) as one weight on the device and one kernel, or None where
    the joined weight would not fit one binding."""
    n_first = ex.weight(op.weights[0]).n
    joined = _joined_weight(ex, op.weights[0], other.weights[0])
    if joined is None:
        return None
    rows = ex.rows_of(op)
    return Launch(rows, QuantMatmul(ex.device, joined, ex.acts[op.ins[0]], ex.acts[op.out], ex.counts[rows],
                                    second=(n_first, ex.acts[other.out])))


def _matmul_then_norm(ex: GpuExecutor, op: Op, norm: Op, add: Op, then: Op | None) -> Launch | None:
    """A matmul whose kernel also runs the residual post-norm of its output (`_residual_norm`), or
    None where it cannot: a norm per head rather than per row, or a weight in several bindings."""
    weight, rows = ex.weight(op.weights[0]), ex.rows_of(op)
    if norm.params["group"] != ex.width(op.out) or len(weight.chunks) > 1:
        return None
    residual = ResidualNorm(ex.vector(norm.weights[0]), ex.acts[add.out], norm.params["eps"], _next_norm(ex, then))
    return Launch(rows, QuantMatmul(ex.device, weight, ex.acts[op.ins[0]], ex.acts[op.out], ex.counts[rows],
                                    norm=residual))


def _glu(ex: GpuExecutor, op: Op) -> Launch:
    width, act = ex.width(op.out), op.params["act"]
    x, rows = ex.acts[op.ins[0]], ex.counts["T"]
    # gate and up rows in one weight: a decode step's GLU is one mat-vec dispatch
    joined = _joined_weight(ex, *op.weights)
    if joined is not None:
        return Launch("T", QuantMatmul(ex.device, joined, x, ex.acts[op.out], rows, glu=act))
    gate_w, up_w = (ex.weight(name) for name in op.weights)
    size = 4 * width * ex.capacity["T"]
    # every layer's gate/up projections are temporaries: one pair of buffers serves them all
    gate, up = ((scratch(ex.device, f"glu {part}", size), 0, size) for part in ("gate", "up"))
    return Launch("T", QuantMatmul(ex.device, gate_w, x, gate, rows), QuantMatmul(ex.device, up_w, x, up, rows),
                  Glu(ex.device, gate, up, ex.acts[op.out], width=width, act=act))


def _rope(ex: GpuExecutor, index: int, fused: Fusions) -> Launch:
    """Rope op `index` with what `fusions` folded into it: its norm, a KV store, an earlier rope."""
    ops = ex.plan.ops
    op, p = ops[index], ops[index].params

    def norm(rope: int) -> tuple[np.ndarray, float] | None:
        folded = fused.rope_norm.get(rope)
        return (ex.host_vector(folded.weights[0]), folded.params["eps"]) if folded else None

    freqs = ex.host_vector(op.weights[0]) if op.weights else None
    kv = also = None
    if index in fused.rope_store:
        attention = fused.rope_store[index]
        kv = (_attention_kernel(ex, attention, stored=True), ex.acts[ops[attention].ins[2]], ex.inputs["slots"])
    if index in fused.rope_pair:
        other = fused.rope_pair[index]
        also = RopeHeads(ex.acts[ops[other].out], ops[other].params["n_heads"], norm(other))
    return Launch("T", Rope(ex.device, ex.acts[op.ins[0]], ex.acts[op.out], ex.inputs["positions"],
                            n_heads=p["n_heads"], head_dim=p["head_dim"], n_rot=p["n_rot"], base=p["base"],
                            scale=p["scale"], neox=p["neox"], freq_factors=freqs, norm=norm(index), kv=kv, also=also))


def _attention_kernel(ex: GpuExecutor, index: int, stored: bool) -> Attention:
    """The attention of op `index` (built once); with `stored`, a rope writes its KV cache."""
    if index not in ex.attentions:
        op = ex.plan.ops[index]
        p = op.params
        q, k, v = (ex.acts[name] for name in op.ins)
        ex.attentions[index] = Attention(
            ex.device, q, None if stored else k, None if stored else v, ex.inputs["positions"], ex.inputs["slots"],
            ex.acts[op.out], n_heads=p["n_heads"], n_kv_heads=p["n_kv_heads"], head_dim=p["head_dim"],
            n_ctx=ex.n_ctx, n_slots=ex.n_slots, window=p["window"], scale=p["scale"], kv_f16=ex.kv_f16,
            label=f"attention {p['layer']}")
    return ex.attentions[index]


def _add(ex: GpuExecutor, op: Op) -> Launch:
    a, b = (ex.acts[name] for name in op.ins)
    return Launch(ex.rows_of(op), Add(ex.device, a, b, ex.acts[op.out], width=ex.width(op.out)))


def _gather(ex: GpuExecutor, op: Op) -> Launch:
    return Launch("R", Gather(ex.device, ex.acts[op.ins[0]], ex.inputs["logit_rows"], ex.acts[op.out],
                              width=ex.width(op.out)))


# rope and attention are built in build_launches (they may be fused with their neighbours)
BUILDERS: dict[str, Callable[[GpuExecutor, Op], Launch]] = {
    "embed": _embed, "rmsnorm": _rmsnorm, "matmul": _matmul, "glu": _glu, "add": _add, "gather": _gather,
}
