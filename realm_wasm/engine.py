"""One loaded model and its executor; `generate` streams a completion through the one loop.

`Engine.generate` is a one-request use of `scheduler.Scheduler`, the loop the server runs for
many: tokenize, submit, step until the request finishes, yield its tokens. `Engine.load` is the
CPython way in (a GGUF file, WebGPU through wgpu-py or numpy); the page builds an `Engine` from a
streamed model instead (web/realm_web_host.py).
"""

from __future__ import annotations

from collections.abc import Generator, Iterator, Sequence
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
from .scheduler import GREEDY, PREFILL_CHUNK, Finished, Request, Scheduler, TokenEvent
from .tokenizer import Tokenizer

__all__ = ["GREEDY", "PREFILL_CHUNK", "ContextOverflow", "Engine", "Executor", "Model", "TokenEvent"]


class Executor(Protocol):
    name: str  # "webgpu" | "numpy"
    n_slots: int  # KV-cache slots: sequences it can hold at once
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


class Engine:
    """One model, one executor and its KV-cache slots (`generate` uses slot 0)."""

    def __init__(self, model: Model, executor: Executor, n_ctx: int) -> None:
        self.model, self.executor, self.n_ctx = model, executor, n_ctx
        # the tokens whose keys and values each slot holds, kept by whoever steps it (KV reuse)
        self.slot_tokens: list[tuple[int, ...]] = [()] * executor.n_slots
        self._scheduler: Scheduler | None = None

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
        """Feed tokens in chunks, outside any generation; yields each chunk's logits (all rows, or
        only the last row). For teacher forcing: the slot's cached tokens are forgotten."""
        if start + len(ids) > self.n_ctx:
            raise ContextOverflow(f"{start + len(ids)} tokens do not fit the context of {self.n_ctx}")
        self.slot_tokens[slot] = ()
        size = min(PREFILL_CHUNK, self.executor.max_logit_rows) if all_logits else PREFILL_CHUNK
        for i in range(0, len(ids), size):
            chunk = list(ids[i:i + size])
            last = i + size >= len(ids)
            logits = self.executor.forward(Batch.for_sequence(chunk, start + i, slot, all_logits))
            if all_logits or last:
                yield logits

    def generate(self, prompt: str | Sequence[int], max_tokens: int = 64, sampling: SamplingParams = GREEDY,
                 stop_at_eos: bool = True, stop: Sequence[str] = ()) -> Generator[TokenEvent, None, Finished]:
        """Stream generated tokens for a prompt (text, or token ids including BOS); the text of
        `stop` sequences ends it (they are not returned). Errors of the run raise here. The
        generator's return value is the request's `Finished` (why it ended, token counts, how many
        prompt tokens came from the KV cache)."""
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if self._scheduler is None:
            self._scheduler = Scheduler(self, n_slots=1)
        events: list[TokenEvent | Finished] = []
        self._scheduler.submit(Request(ids, max_tokens, sampling, stop=tuple(stop), stop_at_eos=stop_at_eos),
                               events.append)
        finished: Finished | None = None
        try:
            while finished is None:
                self._scheduler.step()
                for event in events:
                    if isinstance(event, Finished):
                        finished = event
                        if event.exception is not None:
                            raise event.exception
                    else:
                        yield event
                events.clear()
        finally:
            if finished is None:  # the caller stopped reading: end the request, free the slot
                self._scheduler.cancel_all()
        return finished


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
