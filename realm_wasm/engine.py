"""One loaded model and its executor; `generate` streams a completion through the one loop.

`Engine.generate` is a one-request use of `scheduler.Scheduler`, the loop the server runs for
many: tokenize, submit, step until the request finishes, yield its tokens. `Engine.load` is the
CPython way in (a GGUF file, WebGPU through wgpu-py or numpy); the page builds an `Engine` from a
streamed model instead (web/realm_web_host.py).

LoRA adapters (`lora.py`) are loaded by name into the executor's adapter slots, at load
(`Engine.load(..., adapters={name: file})`) or any time later (`load_adapter`, `unload_adapter`);
a request names the ones it applies, with a scale each (`Request.lora`, `generate(lora=...)`).
"""

from __future__ import annotations

from collections.abc import Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from .backends import check_backend, choose
from .errors import ContextOverflow
from .gguf import GGUFHeader, read_gguf
from .gpu.device import Device, GPUUnavailable
from .grammar import GrammarEngine
from .lora import DEFAULT_MAX_LORA_RANK, Adapter, AdapterTable, read_adapter
from .models import build_plan
from .plan import Batch, Plan
from .sampling import SamplingParams
from .scheduler import GREEDY, PREFILL_CHUNK, Finished, Request, Scheduler, TokenEvent
from .speculative import DraftModel, Speculation
from .tokenizer import Tokenizer

__all__ = ["GREEDY", "PREFILL_CHUNK", "ContextOverflow", "Engine", "Executor", "Model", "TokenEvent"]

AdapterSource = str | Path | bytes | bytearray | memoryview  # a file, or its bytes
Lora = Sequence[tuple[str, float]]  # (adapter name, scale) pairs a request applies


class Executor(Protocol):
    name: str  # "webgpu" | "numpy"
    n_slots: int  # KV-cache slots: sequences it can hold at once
    max_logit_rows: int  # rows of logits one step can return
    run_ahead: int  # decode steps the scheduler queues behind the one it reads (0: each runs when submitted)
    steps_per_submit: int  # decode steps one submit_sample may run (`steps`), each fed the one before's ids
    # The most tokens a step may hold and still compute each one bit for bit as a step of its own
    # would: the scheduler keeps a decoding step's drafts within it, so speculation stays exact.
    exact_rows: int
    max_adapters: int  # LoRA adapter slots

    def set_adapter(self, slot: int, adapter: Adapter) -> None:
        """Hold a LoRA adapter in `slot` (0 <= slot < max_adapters), which Batch.lora can name."""

    def clear_adapter(self, slot: int) -> None:
        """Forget the adapter in `slot`."""

    def copy_kv(self, src: int, dst: int, n_tokens: int) -> None:
        """Copy the KV entries of positions [0, n_tokens) of slot `src` to slot `dst`, after the
        steps submitted before: a prompt another sequence has read is not read again."""

    def forward(self, batch: Batch) -> np.ndarray:
        """Logits [R, n_vocab] of the batch's logit rows."""

    def hidden(self, batch: Batch) -> np.ndarray:
        """The final hidden state [R, n_embd] of the batch's logit rows (the output head's input)."""

    def forward_sample(self, batch: Batch, rows: Sequence[tuple[SamplingParams, int]]) -> list[int]:
        """Token ids sampled from each logit row with its (params, step counter)."""

    def submit_sample(self, batch: Batch, rows: Sequence[tuple[SamplingParams, int]],
                      follow: bool = False, masks: Sequence[np.ndarray | None] | None = None,
                      steps: int = 1) -> Pending:
        """`forward_sample` without waiting; `follow`: the tokens are the previous step's samples;
        `masks`: per row, the tokens it may sample (a grammar's bool [n_vocab] mask) or None;
        `steps` (up to steps_per_submit, decode steps only): that many steps, each fed the ids the
        one before sampled, their ids step by step."""


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
        # the adapters (uid, scale) those keys and values were computed with: reused only under the same
        self.slot_adapters: list[tuple[tuple[int, float], ...]] = [()] * executor.n_slots
        self.adapters = AdapterTable(self)
        self.draft: DraftModel | None = None  # drafts for requests that speculate with "draft"
        self._scheduler: Scheduler | None = None

    def set_draft(self, draft: Engine | None) -> None:
        """Use `draft` (same vocabulary, a KV slot per slot of this engine) as the draft model."""
        self.draft = DraftModel(draft, self) if draft is not None else None
        self._scheduler = None

    @classmethod
    def load(cls, path: str | Path, backend: str = "auto", n_ctx: int = 4096, n_slots: int = 1,
             adapters: Mapping[str, AdapterSource] | None = None, max_adapters: int = 0,
             max_lora_rank: int = DEFAULT_MAX_LORA_RANK) -> Engine:
        """A GGUF model on `backend`, with room for `max_adapters` LoRA adapters of rank up to
        `max_lora_rank` (both raised to fit `adapters`, loaded under their names)."""
        f = read_gguf(path)
        model = Model.from_header(f.header)
        n_ctx = min(n_ctx, model.plan.n_ctx_train)
        preload = {name: read_adapter(source, model.plan, name) for name, source in (adapters or {}).items()}
        max_adapters = max(max_adapters, len(preload))
        max_lora_rank = max([max_lora_rank, *(a.rank for a in preload.values())])
        executor = make_executor(backend, model.plan, f.tensor_bytes, n_slots, n_ctx, max_adapters, max_lora_rank)
        engine = cls(model, executor, n_ctx)
        for name, adapter in preload.items():
            engine.adapters.add(name, adapter)
        return engine

    def load_adapter(self, name: str, source: AdapterSource | Adapter) -> Adapter:
        """Load a LoRA adapter (a file, its bytes, or one `read_adapter` already checked) under
        `name`, into a free adapter slot. Call it from the thread that steps this engine."""
        adapter = source if isinstance(source, Adapter) else read_adapter(source, self.model.plan, name)
        self.adapters.add(name, adapter)
        return adapter

    def unload_adapter(self, name: str) -> None:
        """Unload an adapter: new requests cannot use it; the sequences running with it finish
        with it, then its slot frees. Call it from the thread that steps this engine."""
        self.adapters.remove(name)

    @property
    def tokenizer(self) -> Tokenizer:
        return self.model.tokenizer

    def prefill(self, ids: Sequence[int], start: int = 0, slot: int = 0,
                all_logits: bool = False, lora: Lora = ()) -> Iterator[np.ndarray]:
        """Feed tokens in chunks, outside any generation, applying the `lora` adapters; yields each
        chunk's logits (all rows, or only the last row). For teacher forcing: the slot's cached
        tokens are forgotten."""
        if start + len(ids) > self.n_ctx:
            raise ContextOverflow(f"{start + len(ids)} tokens do not fit the context of {self.n_ctx}")
        self.slot_tokens[slot] = ()
        adapters = [(self.adapters.slot(name), float(scale)) for name, scale in lora]
        size = min(PREFILL_CHUNK, self.executor.max_logit_rows) if all_logits else PREFILL_CHUNK
        for i in range(0, len(ids), size):
            chunk = list(ids[i:i + size])
            last = i + size >= len(ids)
            logits = self.executor.forward(Batch.for_sequence(chunk, start + i, slot, all_logits, adapters))
            if all_logits or last:
                yield logits

    def generate(self, prompt: str | Sequence[int], max_tokens: int = 64, sampling: SamplingParams = GREEDY,
                 stop_at_eos: bool = True, stop: Sequence[str] = (), speculation: Speculation | None = None,
                 lora: Lora = (), grammar: GrammarEngine | None = None) -> Generator[TokenEvent, None, Finished]:
        """Stream generated tokens for a prompt (text, or token ids including BOS); the text of
        `stop` sequences ends it (they are not returned); `speculation` drafts tokens to verify
        (the same tokens, faster where drafts are good); `lora`: (adapter name, scale) pairs to
        apply; `grammar`: the output follows it (structured output, grammar.py). Errors of the run
        raise here. The generator's return value is the request's `Finished` (why it ended, token
        counts, prompt tokens from the KV cache, drafts accepted)."""
        events = self.generate_events(prompt, max_tokens, sampling, stop_at_eos, stop, speculation, lora, grammar)
        try:
            for event in events:
                if isinstance(event, TokenEvent):
                    yield event
                else:
                    return event
        finally:
            events.close()  # a caller that stops reading ends the request at once

    def generate_events(self, prompt: str | Sequence[int], max_tokens: int = 64, sampling: SamplingParams = GREEDY,
                        stop_at_eos: bool = True, stop: Sequence[str] = (), speculation: Speculation | None = None,
                        lora: Lora = (), grammar: GrammarEngine | None = None,
                        ) -> Generator[TokenEvent | Finished, None, Finished]:
        """`generate`, also yielding the request's `Finished` as its last event."""
        steps = self.generate_steps(prompt, max_tokens, sampling, stop_at_eos, stop, speculation, lora, grammar)
        try:
            for events in steps:
                yield from events
        finally:
            steps.close()
        return events[-1]

    def generate_steps(self, prompt: str | Sequence[int], max_tokens: int = 64, sampling: SamplingParams = GREEDY,
                       stop_at_eos: bool = True, stop: Sequence[str] = (), speculation: Speculation | None = None,
                       lora: Lora = (), grammar: GrammarEngine | None = None,
                       ) -> Generator[list[TokenEvent | Finished], None, None]:
        """`generate_events` a scheduler step at a time: the events of each step that gave any (one
        read-back may hold several decode steps' tokens), the last list ending with `Finished`. A
        host that pays per call into Python (the page's worker) takes them in one call."""
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if self._scheduler is None:
            self._scheduler = Scheduler(self, n_slots=1, draft=self.draft)
        events: list[TokenEvent | Finished] = []
        self._scheduler.submit(Request(ids, max_tokens, sampling, stop=tuple(stop), stop_at_eos=stop_at_eos,
                                       speculation=speculation, lora=tuple((n, float(s)) for n, s in lora),
                                       grammar=grammar),
                               events.append)
        finished: Finished | None = None
        try:
            while finished is None:
                self._scheduler.step()
                finished = next((e for e in events if isinstance(e, Finished)), None)
                if finished is not None and finished.exception is not None:
                    if tokens := [e for e in events if isinstance(e, TokenEvent)]:
                        yield tokens  # what came before the failure, then the failure
                    raise finished.exception
                if events:
                    yield list(events)
                events.clear()
        finally:
            if finished is None:  # the caller stopped reading: end the request, free the slot
                self._scheduler.cancel_all()


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


def make_executor(backend: str, plan: Plan, weight_bytes, n_slots: int, n_ctx: int, max_adapters: int = 0,
                  max_lora_rank: int = DEFAULT_MAX_LORA_RANK) -> Executor:
    """The executor `backends.choose` picks for this machine (see there for the vocabulary)."""
    device, unavailable = native_device() if check_backend(backend) != "numpy" else (None, "")
    choice = choose(backend, plan.weights.values(), device, unavailable)
    if choice.executor == "webgpu":
        from .gpu.executor import GpuExecutor

        return GpuExecutor(plan, weight_bytes, n_slots=n_slots, n_ctx=n_ctx, device=device, max_tokens=PREFILL_CHUNK,
                           max_adapters=max_adapters, max_lora_rank=max_lora_rank)
    from .cpu import CpuExecutor

    return CpuExecutor(plan, weight_bytes, n_slots=n_slots, n_ctx=n_ctx, max_adapters=max_adapters)
