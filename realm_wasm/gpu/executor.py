"""Runs a Plan on a WebGPU device: wgpu-py natively, js.navigator.gpu in the browser.

At load: `fuse.fuse` turns the plan into the fused program (a list of kernel specs), weights go to
the device once (in their GGML bytes), and each kernel spec is built by its row of `BUILDERS` into
kernel objects with their pipelines and bind groups (`ops.py`, `matmul.py`). Per step: the step's
inputs (a few int32 per token) are written, one command buffer with every dispatch is submitted,
and either the logits or only the sampled token ids are read back.

With `max_adapters` > 0 the weights that read one input (a layer's q, k and v; gate and up) share a
group of that many LoRA adapter slots of rank up to `max_lora_rank` (`gpu/lora.py`), which
`set_adapter` fills while the executor runs: in a mat-vec step (decode) the mat-vecs compute their
token's u = A·x and add B·u themselves; in a mat-mat step the program's `lora_shrink` kernels
compute u once per group, and a kernel after each mat-mat adds B·u. With 0 (the default) no LoRA
code is compiled or dispatched at all.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from ..gguf import TensorInfo
from ..lora import DEFAULT_MAX_LORA_RANK, Adapter, BadAdapter, adaptable_weights, check_batch
from ..plan import STEP_INPUTS, Batch, Op, Plan, head_input
from ..sampling import SamplingParams
from .device import COPY_DST, COPY_SRC, STORAGE, STORAGE_RW, UNIFORM, Binding, Device, Dispatch, ReadBack
from .fuse import Kernel, fuse, kernel_weights, stored_attentions
from .lora import LoraGroup, LoraPool, LoraTokens, round4
from .matmul import GpuWeight, QuantMatmul, ResidualNorm, concat_rows
from .ops import (
    SAMPLING_ROW_BYTES,
    Add,
    Attention,
    Embed,
    Gather,
    Glu,
    MaskLogits,
    NextStep,
    RmsNorm,
    Rope,
    RopeHeads,
    Sampler,
    Softcap,
    mask_bytes,
    pack_masks,
    pack_sampling,
    scratch,
)
from .tuning import tuning_for
from .weights import FileWeights, StreamedWeights, matrix_shape

WeightStore = FileWeights | StreamedWeights
DEFAULT_MAX_TOKENS = 256  # rows per step the activation buffers hold (Engine's prefill chunk)


class Launch:
    """Some dispatches run for each of a step's rows of one kind ("T" tokens or "R" logit rows)."""

    def __init__(self, rows: str, *kernels) -> None:
        self.rows, self.kernels = rows, kernels

    def dispatches(self, counts: dict[str, int]) -> list[Dispatch]:
        """counts: rows of each kind, and "lora" (whether any token uses an adapter: mat-muls then
        add their LoRA kernel)."""
        n = counts[self.rows]
        return [d for k in self.kernels
                for d in (k.dispatches(n, counts.get("lora", False)) if isinstance(k, QuantMatmul | LoraGroup)
                          else k.dispatches(n))]


class GpuExecutor:
    """`forward(batch)` -> logits [R, n_vocab]; `forward_sample(batch, rows)` -> sampled ids [R];
    `submit_sample` queues a sampled step and returns at once."""

    name = "webgpu"

    def __init__(self, plan: Plan, weights: Callable[[TensorInfo], np.ndarray] | WeightStore, *, device: Device,
                 n_slots: int = 1, n_ctx: int = 2048, max_tokens: int = DEFAULT_MAX_TOKENS,
                 max_logit_rows: int | None = None, max_adapters: int = 0,
                 max_lora_rank: int = DEFAULT_MAX_LORA_RANK) -> None:
        self.device, self.plan, self.n_slots, self.n_ctx = device, plan, n_slots, n_ctx
        self.run_ahead = device.run_ahead  # submit_sample returns once the step is queued
        self.steps_per_submit = device.steps_per_submit
        # up to this many rows every matmul is the mat-vec, whose rows do not depend on each other;
        # the mat-mat's f32 order differs, and int8 rounding of x downstream grows that to ~0.5 in
        # the logits (docs/benchmarks.md, 2026-12-04)
        self.exact_rows = tuning_for(device).matvec_max_t
        # a callable gives a tensor's bytes (a GGUF file); a store was filled some other way (a stream)
        self.store = FileWeights(device, weights) if callable(weights) else weights
        # logits [R, n_vocab] must fit one storage binding (128 MiB on some adapters: 128 rows of 262,144);
        # a decoder that never asks for all-position logits needs only a row per sequence
        max_rows = device.limits["max_storage_buffer_binding_size"] // (4 * plan.n_vocab)
        self.capacity = {"T": max_tokens, "R": min(max_tokens, max_rows, max_logit_rows or max_tokens)}
        self.max_logit_rows = self.capacity["R"]
        self.kv_f16 = "shader-f16" in device.features  # as llama.cpp and the numpy executor store it
        self.vectors: dict[str, Binding] = {}

        self.step = StepInputs(device, self.capacity)
        self.inputs, self.counts = self.step.inputs, self.step.counts
        # LoRA: the adapters in each slot, the step's table, and the groups the lora_shrink builders make
        self.max_adapters, self.max_lora_rank = max_adapters, round4(max_lora_rank)
        self.adapters: dict[int, Adapter] = {}
        self.lora_tokens = LoraTokens(device, max_tokens) if max_adapters else None
        self.lora_groups: dict[str, LoraGroup] = {}  # adapted weight -> its group
        self.adaptable = adaptable_weights(plan)
        self.acts = {name: self.buffer(4 * width * self.capacity[rows], name)
                     for name, (rows, width) in plan.buffers.items()}
        self.program = fuse(plan, device.limits["max_storage_buffer_binding_size"],
                            adapted=self.adaptable if max_adapters else ())
        for kernel in self.program:  # a joined pair's outputs: two regions of one buffer
            if "second" in kernel.fused:
                self._colocate(plan.ops[kernel.op].out, plan.ops[kernel.fused["second"]].out)
        # every attention's KV cache is built first: the rope that stores into it needs its buffers
        stored = stored_attentions(self.program)
        self.attentions = {k.op: _attention(self, k.op, stored=k.op in stored)
                           for k in self.program if k.kind == "attention"}
        self.launches = [BUILDERS[kernel.kind](self, kernel) for kernel in self.program]

        n_vocab, r_max = plan.n_vocab, self.capacity["R"]
        self.sampled = self.buffer(4 * r_max, "sampled ids")
        self.sampler = Launch("R", Sampler(device, self.acts["logits"], self.step.sampling, self.sampled,
                                           n_vocab=n_vocab))
        # grammars' token masks: one a sequence (a masked row never speculates), applied before sampling
        size = mask_bytes(n_vocab, r_max, n_slots)
        self.masks = (device.create_buffer(size, STORAGE | COPY_DST, "token masks"), 0, size)
        self.masker = Launch("R", MaskLogits(device, self.acts["logits"], self.masks, n_vocab=n_vocab,
                                             max_rows=r_max))
        # several decode steps a submit: each step's ids kept in a row of `history`, read at the end
        align = device.limits.get("min_storage_buffer_offset_alignment", 256)
        self.history_stride = -(-4 * n_slots // align) * align
        history = self.buffer(self.history_stride * self.steps_per_submit, "decode history")
        self.next_step = NextStep(device, (self.step.buffer, 0, len(self.step.data)), self.step.offsets,
                                  self.sampled, history, stride=self.history_stride, steps=self.steps_per_submit)
        self.history = history
        self._step_dispatches: dict[tuple[int, int, bool, bool], list[Dispatch]] = {}
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

    def lora_pool(self, weights: Sequence[str]) -> LoraPool | None:
        """Adapter slots for a kernel computing these weights' rows (one weight, or a joined pair), in
        the group a lora_shrink kernel built; None without adapters or for weights no adapter may
        change (the output head)."""
        if not self.max_adapters or not set(weights) <= self.adaptable:
            return None
        return self.lora_groups[weights[0]].pool(weights)

    def set_adapter(self, slot: int, adapter: Adapter) -> None:
        """Hold `adapter` in `slot` (writes it into every pool; nothing is rebuilt)."""
        if not 0 <= slot < self.max_adapters:
            raise ValueError(f"adapter slot {slot} out of range (this executor holds {self.max_adapters})")
        if adapter.rank > self.max_lora_rank:
            raise BadAdapter(f"adapter {adapter.name} has rank {adapter.rank}; this executor holds adapters of "
                             f"rank up to {self.max_lora_rank} (max_lora_rank)")
        for group in set(self.lora_groups.values()):
            group.write(slot, adapter)
        self.adapters[slot] = adapter

    def clear_adapter(self, slot: int) -> None:
        for group in set(self.lora_groups.values()):
            group.clear(slot)
        self.adapters.pop(slot, None)

    def rows_of(self, op: Op) -> str:
        return self.plan.buffers[op.out][0]

    def width(self, name: str) -> int:
        return self.plan.buffers[name][1]

    # -- per step --------------------------------------------------------------------------------

    def _write_step(self, batch: Batch, sampling: bytes = b"") -> dict[str, int]:
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
        check_batch(batch, self.adapters)
        self.step.write(batch, counts, sampling)
        if self.lora_tokens:
            self.lora_tokens.write(batch)
        return {**counts, "lora": batch.lora is not None}

    def _dispatches(self, counts: dict[str, int], sample: bool = False) -> list[Dispatch]:
        """The step's dispatches, kept per shape: decode steps repeat one shape, and building the
        list (a few hundred tuples) costs as much host time as recording it."""
        masked = counts.get("masked", False)
        key = (counts["T"], counts["R"], sample, counts["lora"], masked)
        if key not in self._step_dispatches:
            if len(self._step_dispatches) >= 64:  # prefill chunks of many lengths: keep it bounded
                self._step_dispatches.clear()
            launches = self.launches + ([self.masker] if masked else []) + ([self.sampler] if sample else [])
            self._step_dispatches[key] = [d for launch in launches for d in launch.dispatches(counts)]
        return self._step_dispatches[key]

    def forward(self, batch: Batch) -> np.ndarray:
        counts = self._write_step(batch)
        logits = (self.acts["logits"][0], 0, 4 * counts["R"] * self.plan.n_vocab)
        raw = self.device.submit(self._dispatches(counts), read=logits).result()
        return np.frombuffer(raw, np.float32).reshape(counts["R"], self.plan.n_vocab)

    def hidden(self, batch: Batch) -> np.ndarray:
        """The final hidden state [R, n_embd] of the batch's logit rows: the output head's input,
        read back after a whole step (the head's logits are computed too, unread)."""
        counts = self._write_step(batch)
        name = head_input(self.plan)
        buffer, offset, _ = self.acts[name]
        raw = self.device.submit(self._dispatches(counts), read=(buffer, offset, 4 * counts["R"] * self.width(name)))
        return np.frombuffer(raw.result(), np.float32).reshape(counts["R"], self.width(name))

    def copy_kv(self, src: int, dst: int, n_tokens: int) -> None:
        """Copy positions [0, n_tokens) of KV slot `src` to slot `dst`, queued behind the steps
        submitted before (which wrote them). WebGPU copies only between two buffers, so each layer's
        rows go through one scratch buffer, in order within one command buffer."""
        copies = []
        for attention in self.attentions.values():
            stride = attention.slot_bytes
            span = n_tokens * stride // attention.n_ctx
            through = scratch(self.device, "kv copy", stride)
            (a, i), (b, j) = attention.kv_at(src), attention.kv_at(dst)
            for source, target in ((a.k, b.k), (a.v, b.v)):
                copies += [((source[0], i * stride, span), (through, 0, span)),
                           ((through, 0, span), (target[0], j * stride, span))]
        self.device.submit([], copies=copies)

    def forward_sample(self, batch: Batch, rows: Sequence[tuple[SamplingParams, int]]) -> list[int]:
        """One step whose logit rows are sampled on the device: only R token ids come back."""
        return self.submit_sample(batch, rows).result()

    def submit_sample(self, batch: Batch, rows: Sequence[tuple[SamplingParams, int]],
                      follow: bool = False, masks: Sequence[np.ndarray | None] | None = None,
                      steps: int = 1) -> SampledIds:
        """Queue a sampled step without waiting for it. With `follow`, the step's tokens are the
        ids the previous submitted step sampled (its logit row r feeds token r; batch.tokens is
        ignored): the GPU copies them, so step n + 1 can be queued before step n's ids are read.
        `masks`: per row, the tokens it may sample (bool [n_vocab], from a grammar) or None.
        `steps` > 1 (a decode step: row r is token r, no masks): that many steps in this submit,
        each fed the ids the one before sampled; the ids of all of them come back, step by step."""
        if len(rows) != len(batch.logit_rows):
            raise ValueError(f"{len(rows)} sampling rows for {len(batch.logit_rows)} logit rows")
        if steps > 1:
            if any(m is not None for m in masks or ()):
                raise ValueError("a grammar's masks hold for one step: a submit of several steps takes none")
            return self._submit_steps(batch, rows, follow, steps)
        counts = self._write_step(batch, pack_sampling(rows))
        if masks is not None and any(m is not None for m in masks):
            if sum(m is not None for m in masks) > self.n_slots:
                raise ValueError(f"a step with more than {self.n_slots} masked rows (one a sequence)")
            self.device.write_buffer(self.masks[0], 0, pack_masks(masks, self.capacity["R"]))
            counts["masked"] = True
        copies = []
        if follow:
            if self._last_sampled_rows != counts["T"]:
                raise ValueError(f"a follow-up step of {counts['T']} tokens after a step that sampled "
                                 f"{self._last_sampled_rows}")
            size = 4 * counts["T"]
            tokens = self.inputs["tokens"]
            copies = [((self.sampled[0], 0, size), (tokens[0], tokens[1], size))]
        self._last_sampled_rows = counts["R"]
        read = self.device.submit(self._dispatches(counts, sample=True), copies=copies,
                                  read=(self.sampled[0], 0, 4 * counts["R"]))
        return SampledIds(read)

    def _submit_steps(self, batch: Batch, rows: Sequence[tuple[SamplingParams, int]], follow: bool,
                      steps: int) -> SampledIds:
        n = len(batch)
        if not 1 < steps <= self.steps_per_submit:
            raise ValueError(f"{steps} steps in one submit (2..{self.steps_per_submit} allowed)")
        if n > self.n_slots or not np.array_equal(batch.logit_rows, np.arange(n)):
            raise ValueError("several steps in one submit need a decode step: one logit row per token, in order")
        if int(batch.positions.max()) + steps > self.n_ctx:
            raise ValueError(f"{steps} steps from position {int(batch.positions.max())} run past the context "
                             f"({self.n_ctx})")
        counts = self._write_step(batch, pack_sampling(rows))
        copies = []
        if follow:
            if self._last_sampled_rows != n:
                raise ValueError(f"a follow-up step of {n} tokens after a step that sampled {self._last_sampled_rows}")
            tokens = self.inputs["tokens"]
            copies = [((self.sampled[0], 0, 4 * n), (tokens[0], tokens[1], 4 * n))]
        self._last_sampled_rows = n
        key = ("steps", n, steps, counts["lora"])
        if key not in self._step_dispatches:
            one = self._dispatches(counts, sample=True)
            after = [self.next_step.dispatches_after(i, n) for i in range(steps)]
            self._step_dispatches[key] = [d for i in range(steps) for d in (*one, *after[i])]
        stride = self.history_stride
        read = self.device.submit(self._step_dispatches[key], copies=copies,
                                  read=(self.history[0], 0, stride * steps))
        return SampledIds(read, rows=n, stride=stride // 4)


class StepInputs:
    """Everything a step's kernels read from the host, in one buffer written once per step (a
    write costs a host call, through an FFI in the page): the token ids, positions, KV slots and
    logit rows (int32 per row), the row counts the mat-mat kernels read from a uniform (x of a
    vec4<u32>) and the sampler's per-row parameters, each at an offset bindings may start at."""

    def __init__(self, device: Device, capacity: dict[str, int]) -> None:
        align = max(device.limits.get("min_storage_buffer_offset_alignment", 256),
                    device.limits.get("min_uniform_buffer_offset_alignment", 256))
        sizes = {name: 4 * capacity["R" if name == "logit_rows" else "T"] for name in STEP_INPUTS}
        sizes |= {"T count": 16, "R count": 16, "sampling": SAMPLING_ROW_BYTES * capacity["R"]}
        self.offsets, end = {}, 0
        for name, size in sizes.items():
            self.offsets[name] = end
            end = -(-(end + size) // align) * align
        self.buffer = device.create_buffer(end, STORAGE | UNIFORM | COPY_SRC | COPY_DST, "step inputs")
        self.device, self.data = device, bytearray(end)
        at = {name: (self.buffer, self.offsets[name], size) for name, size in sizes.items()}
        self.inputs = {name: at[name] for name in STEP_INPUTS}
        self.counts = {rows: at[f"{rows} count"] for rows in "TR"}
        self.sampling = at["sampling"]

    def write(self, batch: Batch, counts: dict[str, int], sampling: bytes) -> None:
        """The step's inputs, in one write up to the last byte it uses."""
        data, used = self.data, 0
        for name in STEP_INPUTS:
            raw = np.ascontiguousarray(getattr(batch, name), np.int32).tobytes()
            at = self.offsets[name]
            data[at:at + len(raw)] = raw
            used = max(used, at + len(raw))
        for rows, n in counts.items():
            at = self.offsets[f"{rows} count"]
            data[at:at + 4] = n.to_bytes(4, "little")
            used = max(used, at + 16)
        if sampling:
            at = self.offsets["sampling"]
            data[at:at + len(sampling)] = sampling
            used = at + len(sampling)
        self.device.write_buffer(self.buffer, 0, memoryview(data)[:-(-used // 4) * 4])


class SampledIds:
    """Token ids a queued step samples (several steps': `rows` of each `stride` words); `result()`
    waits for them."""

    def __init__(self, read: ReadBack, rows: int = 0, stride: int = 0) -> None:
        self.read, self.rows, self.stride = read, rows, stride

    def result(self) -> list[int]:
        ids = np.frombuffer(self.read.result(), np.int32)
        return (ids.reshape(-1, self.stride)[:, :self.rows] if self.stride else ids).ravel().tolist()


# One builder per kernel kind of the fused program (`fuse.py`): the kernel spec -> its kernel
# objects on the device, reading and writing the executor's buffers.

def _embed(ex: GpuExecutor, k: Kernel) -> Launch:
    op = ex.plan.ops[k.op]
    return Launch("T", Embed(ex.device, ex.weight(op.weights[0]), ex.inputs["tokens"], ex.acts[op.out],
                             scale=op.params["scale"]))


def _next_norm(ex: GpuExecutor, k: Kernel) -> tuple[Binding, Binding] | None:
    """(weight, output) of the pre-norm a residual norm computes next (role "then"), if any."""
    then = ex.plan.ops[k.fused["then"]] if "then" in k.fused else None
    return (ex.vector(then.weights[0]), ex.acts[then.out]) if then else None


def _rmsnorm(ex: GpuExecutor, k: Kernel) -> Launch:
    """A norm; with role "add", a post-norm added into the residual (then the next pre-norm)."""
    op = ex.plan.ops[k.op]
    if "add" not in k.fused:
        return Launch(ex.rows_of(op), RmsNorm(ex.device, ex.acts[op.ins[0]], ex.vector(op.weights[0]),
                                              ex.acts[op.out], width=ex.width(op.out), group=op.params["group"],
                                              eps=op.params["eps"]))
    add = ex.plan.ops[k.fused["add"]]
    return Launch(ex.rows_of(add), RmsNorm(ex.device, ex.acts[op.ins[0]], ex.vector(op.weights[0]), ex.acts[add.out],
                                           width=ex.width(add.out), group=op.params["group"], eps=op.params["eps"],
                                           residual=True, then=_next_norm(ex, k)))


def _matmul(ex: GpuExecutor, k: Kernel) -> Launch:
    """y = W·x; with role "second", two projections of x from one joined weight; with "norm",
    the mat-vec's last workgroup also runs the residual post-norm (and the next pre-norm)."""
    op, rows = ex.plan.ops[k.op], ex.rows_of(ex.plan.ops[k.op])
    x, y = ex.acts[op.ins[0]], ex.acts[op.out]
    if "second" in k.fused:
        other = ex.plan.ops[k.fused["second"]]
        n_first = ex.weight(op.weights[0]).n
        joined = _joined_weight(ex, op.weights[0], other.weights[0])
        return Launch(rows, QuantMatmul(ex.device, joined, x, y, ex.counts[rows], second=(n_first, ex.acts[other.out]),
                                        lora=ex.lora_pool((op.weights[0], other.weights[0]))))
    norm = None
    if "add" in k.fused:  # the residual add, after the post-norm if there is one
        post = ex.plan.ops[k.fused["norm"]] if "norm" in k.fused else None
        add, then = ex.plan.ops[k.fused["add"]], ex.plan.ops[k.fused.get("then", k.fused["add"])]
        norm = ResidualNorm(ex.vector(post.weights[0]) if post else None, ex.acts[add.out],
                            (post or then).params.get("eps", 0.0), _next_norm(ex, k))
    return Launch(rows, QuantMatmul(ex.device, ex.weight(op.weights[0]), x, y, ex.counts[rows], norm=norm,
                                    lora=ex.lora_pool(op.weights)))


def _joined_weight(ex: GpuExecutor, first: str, second: str) -> GpuWeight:
    """Weights `first` and `second` as one, rows of one then the other, copied on the device; the
    originals are freed (the joined copy is all the kernels read). `fuse` checked that they join."""
    joined = concat_rows(ex.device, ex.weight(first), ex.weight(second), label=f"{first} + {second}")
    if joined is None:
        raise AssertionError(f"fuse joined {first} and {second}, which concat_rows cannot join")
    for name in (first, second):
        ex.store.release(ex.plan.weights[name])
    return joined


def _lora_shrink(ex: GpuExecutor, k: Kernel) -> Launch:
    """The LoRA group of the weights its reader kernels multiply x by: u = A·x once per mat-mat step."""
    readers = [kernel for kernel in ex.program if kernel.op in k.fused.values() and kernel.kind != "lora_shrink"]
    names = [name for reader in readers for name in kernel_weights(ex.plan, reader)]
    shapes = [matrix_shape(ex.plan.weights[name]) for name in names]
    tuning = tuning_for(ex.device)
    group = LoraGroup(ex.device, ex.lora_tokens, ex.acts[ex.plan.ops[k.op].ins[0]],
                      [(name, n) for name, (n, _) in zip(names, shapes, strict=True)], shapes[0][1],
                      slots=ex.max_adapters, rank=ex.max_lora_rank, workgroup=tuning.wg,
                      subgroups="subgroups" in ex.device.features, matvec_max_t=tuning.matvec_max_t,
                      label=" + ".join(names))
    ex.lora_groups.update(dict.fromkeys(names, group))
    return Launch("T", group)


def _glu(ex: GpuExecutor, k: Kernel) -> Launch:
    """act(W_gate·x) * (W_up·x) from gate and up joined in one weight: one mat-vec at decode."""
    op = ex.plan.ops[k.op]
    joined = _joined_weight(ex, *op.weights)
    return Launch("T", QuantMatmul(ex.device, joined, ex.acts[op.ins[0]], ex.acts[op.out], ex.counts["T"],
                                   glu=op.params["act"], lora=ex.lora_pool(op.weights)))


def _glu_split(ex: GpuExecutor, k: Kernel) -> Launch:
    """The GLU where gate and up cannot be joined: two matmuls into scratch, then the activation."""
    op = ex.plan.ops[k.op]
    width, x, rows = ex.width(op.out), ex.acts[op.ins[0]], ex.counts["T"]
    size = 4 * width * ex.capacity["T"]
    # every layer's gate/up projections are temporaries: one pair of buffers serves them all
    gate, up = ((scratch(ex.device, f"glu {part}", size), 0, size) for part in ("gate", "up"))
    projections = [QuantMatmul(ex.device, ex.weight(name), x, out, rows, lora=ex.lora_pool((name,)))
                   for name, out in zip(op.weights, (gate, up), strict=True)]
    return Launch("T", *projections, Glu(ex.device, gate, up, ex.acts[op.out], width=width, act=op.params["act"]))


def _rope(ex: GpuExecutor, k: Kernel) -> Launch:
    """RoPE with what fuse folded in: its Q/K norm ("norm"), the queries' rope and norm ("pair",
    "pair_norm") and the KV-cache store of an attention ("store")."""
    ops = ex.plan.ops
    op, p = ops[k.op], ops[k.op].params

    def norm(role: str) -> tuple[np.ndarray, float] | None:
        if role not in k.fused:
            return None
        folded = ops[k.fused[role]]
        return ex.host_vector(folded.weights[0]), folded.params["eps"]

    freqs = ex.host_vector(op.weights[0]) if op.weights else None
    kv = also = None
    if "store" in k.fused:
        attention = ops[k.fused["store"]]
        kv = (ex.attentions[k.fused["store"]], ex.acts[attention.ins[2]], ex.inputs["slots"])
    if "pair" in k.fused:
        other = ops[k.fused["pair"]]
        also = RopeHeads(ex.acts[other.out], other.params["n_heads"], norm("pair_norm"))
    return Launch("T", Rope(ex.device, ex.acts[op.ins[0]], ex.acts[op.out], ex.inputs["positions"],
                            n_heads=p["n_heads"], head_dim=p["head_dim"], n_rot=p["n_rot"], base=p["base"],
                            scale=p["scale"], neox=p["neox"], freq_factors=freqs, norm=norm("norm"), kv=kv, also=also))


def _attention(ex: GpuExecutor, index: int, stored: bool) -> Attention:
    """Attention op `index` with its KV cache; with `stored`, a rope writes that cache."""
    op = ex.plan.ops[index]
    p = op.params
    q, k, v = (ex.acts[name] for name in op.ins)
    return Attention(ex.device, q, None if stored else k, None if stored else v, ex.inputs["positions"],
                     ex.inputs["slots"], ex.acts[op.out], n_heads=p["n_heads"], n_kv_heads=p["n_kv_heads"],
                     head_dim=p["head_dim"], n_ctx=ex.n_ctx, n_slots=ex.n_slots, window=p["window"],
                     scale=p["scale"], softcap=p.get("softcap", 0.0), kv_f16=ex.kv_f16,
                     label=f"attention {p['layer']}")


def _add(ex: GpuExecutor, k: Kernel) -> Launch:
    """a + b; with role "then", a residual add x += o and the next pre-norm in one kernel."""
    op = ex.plan.ops[k.op]
    a, b = (ex.acts[name] for name in op.ins)
    if "then" in k.fused:
        then = ex.plan.ops[k.fused["then"]]
        return Launch(ex.rows_of(op), RmsNorm(ex.device, b, None, ex.acts[op.out], width=ex.width(op.out),
                                              group=ex.width(op.out), eps=then.params["eps"], residual=True,
                                              then=_next_norm(ex, k)))
    return Launch(ex.rows_of(op), Add(ex.device, a, b, ex.acts[op.out], width=ex.width(op.out)))


def _gather(ex: GpuExecutor, k: Kernel) -> Launch:
    op = ex.plan.ops[k.op]
    return Launch("R", Gather(ex.device, ex.acts[op.ins[0]], ex.inputs["logit_rows"], ex.acts[op.out],
                              width=ex.width(op.out)))


def _in_place(ex: GpuExecutor, op: Op) -> Binding:
    if op.ins[0] != op.out:
        raise ValueError(f"{op.kind} {op.ins[0]} -> {op.out}: the GPU runs {op.kind} in place only")
    return ex.acts[op.out]


def _bias(ex: GpuExecutor, k: Kernel) -> Launch:
    op = ex.plan.ops[k.op]
    y = _in_place(ex, op)
    return Launch(ex.rows_of(op), Add(ex.device, y, ex.vector(op.weights[0]), y, width=ex.width(op.out), bias=True))


def _softcap(ex: GpuExecutor, k: Kernel) -> Launch:
    op = ex.plan.ops[k.op]
    return Launch(ex.rows_of(op), Softcap(ex.device, _in_place(ex, op), width=ex.width(op.out), cap=op.params["cap"]))


BUILDERS: dict[str, Callable[[GpuExecutor, Kernel], Launch]] = {
    "embed": _embed, "rmsnorm": _rmsnorm, "matmul": _matmul, "glu": _glu, "glu_split": _glu_split,
    "rope": _rope, "attention": lambda ex, k: Launch("T", ex.attentions[k.op]), "add": _add, "gather": _gather,
    "lora_shrink": _lora_shrink, "bias": _bias, "softcap": _softcap,
}
