"""Sessions over one loaded model: prompt -> prefill -> decode loop -> streamed text."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from .backends import check_backend, choose
from .errors import ContextOverflow
from .gguf import GGUFHeader, read_gguf
from .gpu.device import Device, GPUUnavailable
from .models import build_plan
from .plan import Batch, Plan
from .sampling import SamplingParams
from .tokenizer import StreamDecoder, Tokenizer

PREFILL_CHUNK = 256  # tokens per prefill step: bounds activation memory on every executor
GREEDY = SamplingParams()


class Executor(Protocol):
    name: str
    max_logit_rows: int  # rows of logits one step can return
    queues_ahead: bool  # submit_sample returns before the step has run (a GPU queue)

    def forward(self, batch: Batch) -> np.ndarray:
        """Logits [R, n_vocab] of the batch's logit rows."""

    def forward_sample(self, batch: Batch, rows: Sequence[tuple[SamplingParams, int]]) -> list[int]:
        """Token ids sampled from each logit row with its (params, step counter)."""

    def submit_sample(self, batch: Batch, rows: Sequence[tuple[SamplingParams, int]],
                      follow: bool = False) -> Pending:
        """`forward_sample` without waiting; `follow`: the tokens are the previous step's samples."""


class Pending(Protocol):
    def result(self) -> list[int]: ...


@dataclass(frozen=True)
class Model:
    header: GGUFHeader
    tokenizer: Tokenizer
    plan: Plan

    @classmethod
    def from_header(cls, header: GGUFHeader) -> Model:
        return cls(header, Tokenizer.from_metadata(header.metadata), build_plan(header))


@dataclass(frozen=True)
class TokenEvent:
    token_id: int | None  # None: a last event carrying only text the decoder held back
    text: str  # the new complete UTF-8 text this token made (may be "")
    index: int  # 0 for the first generated token
    elapsed_s: float  # since generate() started


class Engine:
    """One model, one executor; sequences live in KV-cache slots (slot 0 for `generate`)."""

    def __init__(self, model: Model, executor: Executor, n_ctx: int) -> None:
        self.model, self.executor, self.n_ctx = model, executor, n_ctx

    @classmethod
    def load(cls, path: str | Path, backend: str = "auto", n_ctx: int = 4096, n_slots: int = 1) -> Engine:
        f = read_gguf(path)
        model = Model.from_header(f.header)
        n_ctx = min(n_ctx, model.plan.n_ctx_train)
        return cls(model, make_executor(backend, model.plan, f.tensor_bytes, n_slots, n_ctx), n_ctx)

    @property
    def tokenizer(self) -> Tokenizer:
        return self.model.tokenizer

    def prefill(self, ids: Sequence[int], start: int = 0, slot: int = 0,
                all_logits: bool = False) -> Iterator[np.ndarray]:
        """Feed tokens in chunks; yields each chunk's logits (all rows, or only the last row)."""
        if start + len(ids) > self.n_ctx:
            raise ContextOverflow(f"{start + len(ids)} tokens do not fit the context of {self.n_ctx}")
        size = min(PREFILL_CHUNK, self.executor.max_logit_rows) if all_logits else PREFILL_CHUNK
        for i in range(0, len(ids), size):
            chunk = list(ids[i:i + size])
            last = i + size >= len(ids)
            logits = self.executor.forward(Batch.for_sequence(chunk, start + i, slot, all_logits))
            if all_logits or last:
                yield logits

    def generate(self, prompt: str | Sequence[int], max_tokens: int = 64,
                 sampling: SamplingParams = GREEDY, stop_at_eos: bool = True) -> Iterator[TokenEvent]:
        """Stream generated tokens for a prompt (text, or token ids including BOS)."""
        t0 = time.perf_counter()
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise ValueError("empty prompt")
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        if len(ids) + max_tokens > self.n_ctx:
            raise ContextOverflow(f"prompt of {len(ids)} tokens + max_tokens {max_tokens} exceeds the "
                                  f"context of {self.n_ctx} tokens")
        # all but the last chunk only fill the KV cache; the last is the first sampling step
        pos = (len(ids) - 1) // PREFILL_CHUNK * PREFILL_CHUNK
        last = ids[pos:]
        for _ in self.prefill(ids[:pos]):
            pass
        decoder = StreamDecoder(self.tokenizer)
        # A GPU runs one step ahead: step n + 1 is queued (its token the GPU's own sample of step n)
        # before step n's id is read back, so the GPU never waits for the host between tokens. A
        # step queued past an end of text only writes a KV entry past the sequence, never read.
        ahead = self.executor.queues_ahead
        step = self.executor.submit_sample(Batch.for_sequence(last, pos), [(sampling, 0)])
        for n in range(max_tokens):
            pos += len(last)
            more = n + 1 < max_tokens
            if more and ahead:
                step_ahead = self.executor.submit_sample(Batch.for_sequence([0], pos), [(sampling, n + 1)],
                                                         follow=True)
            [token] = step.result()
            if stop_at_eos and token in self.tokenizer.eot_ids:
                break
            yield TokenEvent(token, decoder.feed(token), n, time.perf_counter() - t0)
            last = [token]
            if more:
                step = step_ahead if ahead else self.executor.submit_sample(Batch.for_sequence(last, pos),
                                                                            [(sampling, n + 1)])
        tail = decoder.flush()
        if tail:
            yield TokenEvent(None, tail, n + 1, time.perf_counter() - t0)


def native_device() -> tuple[Device | None, str]:
    """This machine's WebGPU device through wgpu-py (CPython), or None and why there is none."""
    try:
        from .gpu.native import NativeDevice
    except ImportError as e:
        return None, f"wgpu-py is not installed ({e}; pip install 'realm[gpu]')"
    try:
        return NativeDevice.create(), ""
    except GPUUnavailable as e:
        return None, str(e)


def make_executor(backend: str, plan: Plan, weight_bytes, n_slots: int, n_ctx: int) -> Executor:
    """The executor `backends.choose` picks for this machine (see there for the vocabulary)."""
    device, unavailable = native_device() if check_backend(backend) != "numpy" else (None, "")
    choice = choose(backend, plan, device, unavailable)
    if choice.executor == "webgpu":
        from .gpu.executor import GpuExecutor

        return GpuExecutor(plan, weight_bytes, n_slots=n_slots, n_ctx=n_ctx, device=device, max_tokens=PREFILL_CHUNK)
    from .cpu import CpuExecutor

    return CpuExecutor(plan, weight_bytes, n_slots=n_slots, n_ctx=n_ctx)
