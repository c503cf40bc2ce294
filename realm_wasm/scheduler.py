"""Continuous batching: many sequences of many tenants share one model, one forward pass per step.

A fixed pool of KV-cache slots bounds memory: a request waits in its tenant's queue until a slot is
free, runs there until it finishes or is cancelled, and gives the slot back. Every `step()` builds
ONE `Batch`: one decode token of every running sequence first (they are cheap and latency-bound),
then prefill chunks of newly admitted prompts sharing what is left of `max_step_tokens` evenly.
Each sequence's logits row is sampled (by the executor: on the GPU only token ids come back) with
its own `SamplingParams` and step counter, so its tokens never depend on what else was in the
batch (up to float rounding of the batched matmuls).

Fairness: when a slot frees, the next request comes from the waiting tenant with the fewest running
sequences per unit of its `share`; ties go to the tenant admitted least recently (round-robin).

Threads: `submit()` and `cancel()` may be called from any thread: they only append to an inbox that
the next `step()` drains. `step()` must always run on one thread (executors are not thread-safe).
Events reach each request's `sink` from inside `step()`:

    scheduler = Scheduler(engine, n_slots=4)
    scheduler.submit(Request(ids, max_tokens=32, tenant="acme"), events.append)
    while scheduler.busy:
        scheduler.step()          # in the browser: `await asyncio.sleep(0)` between steps

A sink gets zero or more `TokenEvent`s (the last may carry only held-back text, `token_id` None)
and then exactly one `Finished`.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from .engine import GREEDY, PREFILL_CHUNK, ContextOverflow, Engine, TokenEvent
from .plan import Batch
from .sampling import SamplingParams
from .tokenizer import StreamDecoder


@dataclass(frozen=True)
class Request:
    prompt_ids: Sequence[int]  # including BOS
    max_tokens: int
    sampling: SamplingParams = SamplingParams()
    tenant: str = ""
    stop: tuple[str, ...] = ()  # text that ends generation; it is not part of the output
    stop_at_eos: bool = True


@dataclass(frozen=True)
class Finished:
    reason: str  # "stop" (end of text or a stop sequence), "length", "cancelled" or "error"
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None


Event = TokenEvent | Finished
Sink = Callable[[Event], None]


@dataclass(frozen=True)
class Stats:
    n_slots: int
    running: int
    queued: int  # waiting for a slot, including submissions the next step has not seen yet
    steps: int
    tokens_generated: int


class StopText:
    """Cuts streamed text at the first stop sequence, holding back a tail that may begin one."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(s for s in stops if s)
        self.held = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """(text that is safe to emit, whether a stop sequence was reached)."""
        if not self.stops:
            return text, False
        text = self.held + text
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.held = ""
            return text[:min(hits)], True
        keep = max((k for s in self.stops for k in range(1, min(len(s), len(text) + 1))
                    if text.endswith(s[:k])), default=0)
        self.held = text[len(text) - keep:]
        return text[:len(text) - keep], False

    def flush(self) -> str:
        held, self.held = self.held, ""
        return held


@dataclass(eq=False)
class _Sequence:
    id: int
    request: Request
    sink: Sink
    decoder: StreamDecoder
    stop: StopText
    t0: float
    tokens: list[int] = field(default_factory=list)  # prompt, then every generated token
    fed: int = 0  # tokens already in the KV cache; tokens[fed:] go into the next steps
    generated: int = 0
    slot: int = -1

    @property
    def pending(self) -> int:
        return len(self.tokens) - self.fed


class Scheduler:
    """Runs the requests of many tenants through one engine with `n_slots` KV-cache slots."""

    def __init__(self, engine: Engine, n_slots: int, max_step_tokens: int = PREFILL_CHUNK,
                 shares: dict[str, float] | None = None) -> None:
        if n_slots < 1:
            raise ValueError(f"n_slots must be >= 1, got {n_slots}")
        # every running sequence may need one decode row; what is left must let prefill progress
        if max_step_tokens <= n_slots:
            raise ValueError(f"max_step_tokens ({max_step_tokens}) must exceed n_slots ({n_slots})")
        if n_slots > engine.executor.max_logit_rows:
            raise ValueError(f"n_slots ({n_slots}) is more than the {engine.executor.max_logit_rows} logit rows "
                             f"the {engine.executor.name} executor returns per step")
        self.engine, self.n_slots, self.max_step_tokens = engine, n_slots, max_step_tokens
        self.shares = dict(shares or {})
        self._ids = itertools.count(1)
        self._inbox: deque[tuple[str, object]] = deque()  # ("submit", _Sequence) | ("cancel", id)
        self._queues: dict[str, deque[_Sequence]] = {}  # tenant -> waiting sequences, oldest first
        self._running: dict[int, _Sequence] = {}  # id -> sequence, in admission order
        self._free_slots = list(range(n_slots - 1, -1, -1))  # pop() hands out slot 0 first
        self._last_admitted: dict[str, int] = {}  # tenant -> admission counter, for round-robin
        self._admissions = 0
        self._steps = self._generated = 0

    # --- any thread ------------------------------------------------------------------------------

    def submit(self, request: Request, sink: Sink) -> int:
        """Check the request, queue it, and return its id (for `cancel`).

        Raises ValueError (ContextOverflow when it cannot fit the context) at once, from the
        calling thread; every later outcome, errors included, reaches `sink` as events."""
        ids = [int(t) for t in request.prompt_ids]
        vocab = self.engine.tokenizer.vocab_size
        if not ids:
            raise ValueError("empty prompt")
        if not all(0 <= t < vocab for t in ids):
            raise ValueError(f"prompt has token ids outside the vocab of {vocab}")
        if request.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {request.max_tokens}")
        if len(ids) + request.max_tokens > self.engine.n_ctx:
            raise ContextOverflow(f"prompt of {len(ids)} tokens + max_tokens {request.max_tokens} exceeds "
                                  f"the context of {self.engine.n_ctx} tokens")
        seq = _Sequence(next(self._ids), request, sink, StreamDecoder(self.engine.tokenizer),
                        StopText(request.stop), time.perf_counter(), ids)
        self._inbox.append(("submit", seq))
        return seq.id

    def cancel(self, request_id: int) -> None:
        """Stop a request wherever it is; its sink gets Finished("cancelled"). Unknown ids are ignored."""
        self._inbox.append(("cancel", request_id))

    def stats(self) -> Stats:
        """Counts for monitoring; from another thread they may lag a step behind."""
        queued = sum(len(q) for q in list(self._queues.values()))
        queued += sum(kind == "submit" for kind, _ in list(self._inbox))
        return Stats(self.n_slots, len(self._running), queued, self._steps, self._generated)

    # --- the stepping thread ---------------------------------------------------------------------

    @property
    def busy(self) -> bool:
        """Anything queued, running or not yet seen: keep calling `step()`."""
        return bool(self._inbox or self._running or any(self._queues.values()))

    def step(self) -> bool:
        """Admit, run one forward pass, sample and stream. False when there was nothing to do."""
        self._drain_inbox()
        self._admit()
        if not self._running:
            return False
        plan = self._plan_step()
        batch, sampled = self._build_batch(plan)
        # each row is sampled with its own sequence's parameters and step counter (on the device)
        rows = [(seq.request.sampling, seq.generated) for seq in sampled] or [(GREEDY, 0)]
        try:
            tokens = self.engine.executor.forward_sample(batch, rows)
        except Exception as e:  # fail this step's sequences, keep serving the others
            for seq, _ in plan:
                self._finish(seq, "error", error=f"{type(e).__name__}: {e}")
            return True
        self._steps += 1
        for seq, n in plan:
            seq.fed += n
        for seq, token in zip(sampled, tokens, strict=False):  # a padding row has no sequence
            self._advance(seq, token)
        return True

    def cancel_all(self) -> None:
        """Finish every queued and running request as cancelled (at shutdown)."""
        self._drain_inbox()
        for queue in self._queues.values():
            while queue:
                self._finish(queue.popleft(), "cancelled")
        for seq in list(self._running.values()):
            self._finish(seq, "cancelled")

    def _drain_inbox(self) -> None:
        while self._inbox:
            kind, item = self._inbox.popleft()
            if kind == "submit":
                self._queues.setdefault(item.request.tenant, deque()).append(item)
            else:
                self._cancel_now(item)

    def _cancel_now(self, request_id: int) -> None:
        if request_id in self._running:
            self._finish(self._running[request_id], "cancelled")
            return
        for queue in self._queues.values():
            for seq in queue:
                if seq.id == request_id:
                    queue.remove(seq)
                    self._finish(seq, "cancelled")
                    return

    def _admit(self) -> None:
        while self._free_slots:
            waiting = [t for t, q in self._queues.items() if q]
            if not waiting:
                return
            running = {t: 0 for t in waiting}
            for seq in self._running.values():
                if seq.request.tenant in running:
                    running[seq.request.tenant] += 1
            tenant = min(waiting, key=lambda t: ((running[t] + 1) / self.shares.get(t, 1.0),
                                                 self._last_admitted.get(t, -1)))
            seq = self._queues[tenant].popleft()
            seq.slot = self._free_slots.pop()
            self._running[seq.id] = seq
            self._admissions += 1
            self._last_admitted[tenant] = self._admissions

    def _plan_step(self) -> list[tuple[_Sequence, int]]:
        """How many pending tokens of each running sequence go into this step."""
        take = {seq: 1 for seq in self._running.values() if seq.pending == 1}
        budget = self.max_step_tokens - len(take)
        prefilling = [seq for seq in self._running.values() if seq.pending > 1]
        # share the rest evenly; what a short prompt leaves over goes round again
        while budget > 0 and prefilling:
            share = max(1, budget // len(prefilling))
            for seq in list(prefilling):
                n = min(share, seq.pending - take.get(seq, 0), budget)
                take[seq] = take.get(seq, 0) + n
                budget -= n
                if take[seq] == seq.pending:
                    prefilling.remove(seq)
                if budget == 0:
                    break
        return [(seq, take[seq]) for seq in self._running.values() if seq in take]

    @staticmethod
    def _build_batch(plan: list[tuple[_Sequence, int]]) -> tuple[Batch, list[_Sequence]]:
        """The step's Batch, and the sequences that get a logits row (those whose chunk ends their input)."""
        tokens, positions, slots, rows, sampled = [], [], [], [], []
        for seq, n in plan:
            tokens += seq.tokens[seq.fed:seq.fed + n]
            positions += range(seq.fed, seq.fed + n)
            slots += [seq.slot] * n
            if n == seq.pending:
                rows.append(len(tokens) - 1)
                sampled.append(seq)
        if not rows:  # executors return at least one row: sample one and leave it unread
            rows.append(len(tokens) - 1)
        batch = Batch(np.asarray(tokens, np.int32), np.asarray(positions, np.int32),
                      np.asarray(slots, np.int32), np.asarray(rows, np.int32))
        return batch, sampled

    def _advance(self, seq: _Sequence, token: int) -> None:
        """Stream the sequence's new token; finish on end of text, a stop sequence or length."""
        req = seq.request
        if req.stop_at_eos and token in self.engine.tokenizer.eot_ids:
            self._finish(seq, "stop")
            return
        seq.generated += 1
        self._generated += 1
        text, stopped = seq.stop.feed(seq.decoder.feed(token))
        self._emit(seq, TokenEvent(token, text, seq.generated - 1, time.perf_counter() - seq.t0))
        if stopped:
            self._finish(seq, "stop", flush=False)
        elif seq.generated == req.max_tokens:
            self._finish(seq, "length")
        else:
            seq.tokens.append(token)

    def _finish(self, seq: _Sequence, reason: str, error: str | None = None, flush: bool = True) -> None:
        """Release the text still held back (unless a stop sequence cut it), free the slot, report."""
        if flush and reason in ("stop", "length"):
            text, _ = seq.stop.feed(seq.decoder.flush())
            tail = text + seq.stop.flush()
            if tail:
                self._emit(seq, TokenEvent(None, tail, seq.generated, time.perf_counter() - seq.t0))
        if self._running.pop(seq.id, None) is not None:
            self._free_slots.append(seq.slot)
        self._emit(seq, Finished(reason, len(seq.request.prompt_ids), seq.generated, error))

    def _emit(self, seq: _Sequence, event: Event) -> None:
        try:
            seq.sink(event)
        except Exception:  # nobody can read this sequence any more: stop it, keep serving the others
            self._inbox.append(("cancel", seq.id))
