"""The one generation loop: continuous batching of many sequences, run steps ahead on a GPU.

Every way of generating goes through here: `Engine.generate` (the CLI, benchmarks, the page) is a
one-request use of it, the server steps one per model for all its tenants.

A fixed pool of KV-cache slots bounds memory: a request waits in its tenant's queue until a slot is
free, runs there until it finishes or is cancelled, and gives the slot back. Every step is ONE
`Batch`: one decode token of every running sequence first (cheap and latency-bound), then prefill
chunks of newly admitted prompts sharing what is left of `max_step_tokens` evenly. Each
sequence's logits row is sampled by the executor (on the GPU only token ids come back) with its
own `SamplingParams` and step counter, so its tokens never depend on what else was in the batch
(up to float rounding of the batched matmuls).

Running ahead: on an executor that queues (a GPU), when every running sequence is decoding and
nothing waits to be admitted, steps n + 1 ... n + `run_ahead` (the executor's: its device's) are
submitted before step n's ids are read, each one's tokens copied on the device from the samples of
the step before, so the GPU never idles while the host reads, streams and checks stop conditions,
however long a read takes to come back (in a browser, a mapped buffer comes back through the GPU
process: milliseconds). A queued submit may hold several decode steps (up to the executor's
`steps_per_submit`, none past a sequence's length limit or the context): the device feeds each
step the ids of the one before, so the host builds, submits and reads once for that many tokens
of every sequence. A sequence that ends at step n leaves a wasted row in each step queued behind
it (KV entries past the sequence, never read); once those are read, the next step is built from
the host again.

Everything that ends a generation lives here, once: end of text, stop sequences (cut from the
text, holding back a tail that may begin one), the length limit, and the UTF-8 bytes of a
character split across tokens (flushed at the end).

KV reuse: a slot remembers the tokens whose keys and values it holds. A new request goes to the
free slot sharing the longest prefix with its prompt and feeds only the rest (a chat's next turn
re-reads only the new message), when at least `MIN_REUSE` tokens are shared and were computed with
the same LoRA adapters at the same scales. A running sequence's prompt is shared too: when it
shares more than any free slot, the executor copies those KV entries into the new sequence's slot
(`copy_kv`), and a request whose prompt another is still reading (the choices of an n > 1 request,
a system prompt many requests send) waits for that read, then copies it rather than read it too.

LoRA: a request names up to `LORA_PER_TOKEN` adapters loaded in the engine, with a scale each
(`Request.lora`); every token of its sequence applies them (`Batch.lora`), so sequences with
different adapters, or none, share each step. A sequence holds its adapters from admission to its
end: unloading one meanwhile lets it finish (`lora.AdapterTable`). Whatever changes the executor's
state between steps (loading an adapter) goes through `call`, which runs it on the stepping thread.

Fairness: when a slot frees, the next request comes from the waiting tenant with the fewest running
sequences per unit of its `share`; ties go to the tenant admitted least recently (round-robin).
When no slot is free, a waiting tenant that would still run fewer sequences per share than the
tenant running the most takes a slot from it: that tenant's latest-admitted sequence is preempted
(it goes back to the front of its queue with everything it generated, its KV entries left in the
slot it gave up) and, once re-admitted, re-reads what it had fed and goes on with the same tokens.
So one tenant's flood delays another's request by a step, not by the flood's generations.

Threads: `submit()`, `cancel()` and `call()` may be called from any thread: they only append to an
inbox that the next `step()` drains. `step()` must always run on one thread (executors are not thread-safe).
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
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import ContextOverflow, InvalidRequest
from .lora import AdapterNotFound
from .plan import LORA_PER_TOKEN, Batch, lora_table
from .sampling import NO_RULES, LogitRules, SamplingParams, TokenLogprob, adjust_logits, sample, token_logprobs
from .speculative import DraftModel, Speculation, SpeculationState, accepted_prefix
from .tokenizer import StreamDecoder

if TYPE_CHECKING:
    from .engine import Engine, Pending
    from .grammar import GrammarEngine, GrammarMatcher, LazyGrammar, LazyMatcher

PREFILL_CHUNK = 256  # tokens per step by default: bounds activation memory on every executor
# Fewer shared tokens are re-read rather than reused: a step of up to ~16 tokens costs about what
# one decode step costs (mat-vec kernels), so reusing them saves nothing measurable.
MIN_REUSE = 16
GREEDY = SamplingParams()


@dataclass(frozen=True)
class Request:
    prompt_ids: Sequence[int]  # including BOS
    max_tokens: int
    sampling: SamplingParams = SamplingParams()
    tenant: str = ""
    stop: tuple[str, ...] = ()  # text that ends generation; it is not part of the output
    stop_at_eos: bool = True
    speculation: Speculation | None = None  # draft tokens for the target to verify (speculative.py)
    lora: tuple[tuple[str, float], ...] = ()  # (adapter name, scale): LoRA adapters every token applies
    rules: LogitRules = NO_RULES  # logit_bias and penalties (sampling.LogitRules)
    logprobs: int | None = None  # each token's logprob and this many top alternatives (None: none)
    grammar: GrammarEngine | LazyGrammar | None = None  # structured output, tool calls: it masks tokens

    @property
    def reads_logits(self) -> bool:
        """Whether its steps are sampled on the host from logits read back (see `_launch`); a
        grammar alone is not: its masks go to the executor, which samples under them."""
        return self.rules.active or self.logprobs is not None


@dataclass(frozen=True)
class TokenEvent:
    token_id: int | None  # None: a last event carrying only text the decoder held back
    text: str  # the new complete UTF-8 text this token made (may be "")
    index: int  # 0 for the first generated token
    elapsed_s: float  # since the request was submitted
    logprob: TokenLogprob | None = None  # when the request asked for logprobs


@dataclass(frozen=True)
class Finished:
    reason: str  # "stop" (end of text or a stop sequence), "length", "cancelled" or "error"
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None
    cached_tokens: int = 0  # prompt tokens whose KV entries were reused, not recomputed
    drafted_tokens: int = 0  # speculation: tokens drafted, and how many of them the target accepted
    accepted_tokens: int = 0
    exception: BaseException | None = field(default=None, compare=False, repr=False)  # with "error"


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
    tokens: list[int] = field(default_factory=list)  # prompt, then every generated token read back
    fed: int = 0  # positions written into the KV cache (including steps still on the device)
    requested: int = 0  # samples asked for (including steps still on the device): the next step counter
    generated: int = 0  # samples read back and streamed
    cached: int = 0  # prompt tokens reused from the slot's KV cache (at its first admission)
    preempted: int = 0  # times it gave its slot to another tenant's sequence
    slot: int = -1
    spec: SpeculationState | None = None  # when the request speculates
    adapters: list[tuple[int, float]] = field(default_factory=list)  # (adapter slot, scale), held while admitted
    lora_key: tuple[tuple[int, float], ...] = ()  # (adapter uid, scale): what its KV entries are computed with
    matcher: GrammarMatcher | LazyMatcher | None = None  # where its output (read back so far) stands in the grammar

    @property
    def pending(self) -> int:
        """Known tokens not yet fed (valid when no step of this sequence is on the device)."""
        return len(self.tokens) - self.fed


def _read_prompt(seq: _Sequence) -> Sequence[int]:
    """The prompt tokens whose KV entries a running sequence's submitted steps write."""
    return seq.request.prompt_ids[:seq.fed]


@dataclass
class _Step:
    """A submitted forward pass whose sampled ids have not been read back yet."""

    pending: Pending
    sampled: list[tuple[_Sequence, int]]  # the sequences whose logit rows it samples, and how many, in order
    fed: list[tuple[_Sequence, int]]  # every sequence in it and how many of its tokens
    errors: dict[int, Exception] = field(default_factory=dict)  # sequence id -> why it cannot go on
    depth: int = 1  # decode steps in it (one submit), each sampling one row of every sequence


class Scheduler:
    """Runs the requests of many tenants through one engine with `n_slots` KV-cache slots."""

    def __init__(self, engine: Engine, n_slots: int, max_step_tokens: int = PREFILL_CHUNK,
                 shares: dict[str, float] | None = None, draft: DraftModel | None = None) -> None:
        if n_slots < 1:
            raise InvalidRequest(f"n_slots must be >= 1, got {n_slots}")
        # every running sequence may need one decode row; what is left must let prefill progress
        if max_step_tokens <= n_slots:
            raise InvalidRequest(f"max_step_tokens ({max_step_tokens}) must exceed n_slots ({n_slots})")
        if n_slots > engine.executor.max_logit_rows:
            raise InvalidRequest(f"n_slots ({n_slots}) is more than the {engine.executor.max_logit_rows} logit rows "
                                 f"the {engine.executor.name} executor returns per step")
        if n_slots > len(engine.slot_tokens):
            raise InvalidRequest(f"n_slots ({n_slots}) is more than the engine's {len(engine.slot_tokens)} KV slots")
        self.engine, self.n_slots, self.max_step_tokens, self.draft = engine, n_slots, max_step_tokens, draft
        self.shares = dict(shares or {})
        self._ids = itertools.count(1)
        self._inbox: deque[tuple[str, object]] = deque()  # ("submit", _Sequence) | ("cancel", id)
        self._queues: dict[str, deque[_Sequence]] = {}  # tenant -> waiting sequences, oldest first
        self._running: dict[int, _Sequence] = {}  # id -> sequence, in admission order
        self._free_slots = list(range(n_slots))
        self._freed_at = [-1] * n_slots  # step counter when each slot was last freed
        self._in_flight: deque[_Step] = deque()  # steps on the device, oldest first, when running ahead
        self._last_admitted: dict[str, int] = {}  # tenant -> admission counter, for round-robin
        self._admissions = 0
        self._steps = self._generated = 0

    # --- any thread ------------------------------------------------------------------------------

    def submit(self, request: Request, sink: Sink) -> int:
        """Check the request, queue it, and return its id (for `cancel`).

        Raises InvalidRequest (ContextOverflow when it cannot fit the context) at once, from the
        calling thread; every later outcome, errors included, reaches `sink` as events."""
        ids = [int(t) for t in request.prompt_ids]
        vocab = self.engine.tokenizer.vocab_size
        if not ids:
            raise InvalidRequest("empty prompt")
        if not all(0 <= t < vocab for t in ids):
            raise InvalidRequest(f"prompt has token ids outside the vocab of {vocab}")
        if request.max_tokens < 1:
            raise InvalidRequest(f"max_tokens must be >= 1, got {request.max_tokens}")
        if len(ids) + request.max_tokens > self.engine.n_ctx:
            raise ContextOverflow(f"prompt of {len(ids)} tokens + max_tokens {request.max_tokens} exceeds "
                                  f"the context of {self.engine.n_ctx} tokens")
        spec = request.speculation
        if spec is not None and spec.method == "draft" and self.draft is None:
            raise InvalidRequest("speculation with a draft model asked for, but no draft model is loaded")
        names = [name for name, _ in request.lora]
        if len(names) > LORA_PER_TOKEN or len(set(names)) != len(names):
            raise InvalidRequest(f"a request applies at most {LORA_PER_TOKEN} different adapters, got {names}")
        if not all(math.isfinite(scale) for _, scale in request.lora):
            raise InvalidRequest(f"adapter scales must be finite numbers, got {[s for _, s in request.lora]}")
        for name in names:
            self.engine.adapters.slot(name)  # AdapterNotFound now rather than at admission
        if (request.reads_logits or request.grammar is not None) and spec is not None:
            raise InvalidRequest("speculation cannot be combined with logprobs, logit_bias, penalties or a grammar")
        if not all(0 <= t < vocab for t, _ in request.rules.logit_bias):
            raise InvalidRequest(f"logit_bias has token ids outside the vocab of {vocab}")
        seq = _Sequence(next(self._ids), request, sink, StreamDecoder(self.engine.tokenizer),
                        StopText(request.stop), time.perf_counter(), ids,
                        spec=SpeculationState.start(spec) if spec is not None else None,
                        matcher=request.grammar.matcher() if request.grammar is not None else None)
        self._inbox.append(("submit", seq))
        return seq.id

    def cancel(self, request_id: int) -> None:
        """Stop a request wherever it is; its sink gets Finished("cancelled"). Unknown ids are ignored."""
        self._inbox.append(("cancel", request_id))

    def call(self, fn: Callable[[], Any]) -> Future:
        """Run `fn` on the stepping thread before the next step (between forward passes: the
        executor is never used by two threads); the future gets its result or exception."""
        done: Future = Future()
        self._inbox.append(("call", (fn, done)))
        return done

    def stats(self) -> Stats:
        """Counts for monitoring; from another thread they may lag a step behind."""
        queued = sum(len(q) for q in list(self._queues.values()))
        queued += sum(kind == "submit" for kind, _ in list(self._inbox))
        return Stats(self.n_slots, len(self._running), queued, self._steps, self._generated)

    # --- the stepping thread ---------------------------------------------------------------------

    @property
    def busy(self) -> bool:
        """Anything queued, running, on the device or not yet seen: keep calling `step()`."""
        return bool(self._inbox or self._running or self._in_flight or any(self._queues.values()))

    def step(self) -> bool:
        """Admit, run one forward pass, sample and stream. False when there was nothing to do.

        With steps already on the device, this queues more behind them while it can (up to
        the executor's run_ahead), then reads the oldest one's ids: each call streams one step's tokens."""
        self._drain_inbox()
        if not self._in_flight:
            self._admit()
            if not self._running:
                return False
            self._in_flight.append(self._submit(self._plan_step()))
        # queue steps behind the one about to be read, up to run_ahead of them
        while (sum(s.depth for s in list(self._in_flight)[1:]) < self.engine.executor.run_ahead
               and self._can_follow(self._in_flight[-1])):
            self._in_flight.append(self._submit_follow(self._in_flight[-1]))
        self._receive(self._in_flight.popleft())
        return True

    def hidden_states(self, ids: Sequence[int]) -> np.ndarray:
        """The final hidden state [len(ids), n_embd] of every token of `ids`, fed from position 0 into
        a free KV slot (the one caching the least; it forgets what it cached). Stepping thread only,
        between steps: call it through `call`. InvalidRequest when every slot is running."""
        if not self._free_slots:
            raise InvalidRequest("every KV slot is running a generation; retry shortly")
        if not 0 < len(ids) <= self.engine.n_ctx:
            raise ContextOverflow(f"{len(ids)} tokens do not fit the context of {self.engine.n_ctx}")
        slot = min(self._free_slots, key=lambda s: len(self.engine.slot_tokens[s]))
        self.engine.slot_tokens[slot] = self.engine.slot_adapters[slot] = ()
        size = min(PREFILL_CHUNK, self.engine.executor.max_logit_rows)
        return np.concatenate([self.engine.executor.hidden(Batch.for_sequence(list(ids[i:i + size]), i, slot, True))
                               for i in range(0, len(ids), size)])

    def cancel_all(self) -> None:
        """Finish every queued and running request as cancelled (at shutdown)."""
        self._drain_inbox()
        self._discard_in_flight()
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
            elif kind == "call":
                fn, done = item
                try:
                    done.set_result(fn())
                except Exception as e:  # noqa: BLE001 - the caller gets it
                    done.set_exception(e)
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
        while (admission := self._next_admission()) is not None:
            tenant, victim = admission
            if victim is not None:
                self._preempt(victim)
            seq = self._queues[tenant].popleft()
            try:
                self._hold_adapters(seq)
            except AdapterNotFound as e:  # unloaded since it was submitted
                self._finish(seq, "error", error=e)
                continue
            self._take_slot(seq)
            self._running[seq.id] = seq
            self._admissions += 1
            self._last_admitted[tenant] = self._admissions

    def _next_admission(self) -> tuple[str, _Sequence | None] | None:
        """The tenant whose request is admitted next and, when no slot is free, the running sequence
        it takes the slot of; None when nobody waits, or no tenant runs more than its share."""
        waiting = [t for t, q in self._queues.items() if q and not self._reading_twin(q[0])]
        if not waiting:
            return None
        running: dict[str, list[_Sequence]] = {}
        for seq in self._running.values():  # in admission order
            running.setdefault(seq.request.tenant, []).append(seq)

        def load(tenant: str, extra: int = 0) -> float:
            return (len(running.get(tenant, ())) + extra) / self.shares.get(tenant, 1.0)

        tenant = min(waiting, key=lambda t: (load(t, 1), self._last_admitted.get(t, -1)))
        if self._free_slots:
            return tenant, None
        # the swap must leave the taker below the giver, or the two would take the slot back and forth
        giver = max(running, key=load)
        if giver == tenant or load(tenant, 1) >= load(giver):
            return None
        return tenant, running[giver][-1]

    def _preempt(self, seq: _Sequence) -> None:
        """Give up a running sequence's slot (no step of it is on the device): back to the front of
        its tenant's queue, with its tokens, counters and stream state."""
        del self._running[seq.id]
        self._release_slot(seq, tuple(seq.tokens[:seq.fed]))
        seq.preempted += 1
        self._queues[seq.request.tenant].appendleft(seq)

    def _hold_adapters(self, seq: _Sequence) -> None:
        """The slots of the sequence's adapters, held until it finishes."""
        table = self.engine.adapters
        slots = table.acquire([name for name, _ in seq.request.lora])
        scales = [scale for _, scale in seq.request.lora]
        seq.adapters = list(zip(slots, scales, strict=True))
        seq.lora_key = tuple((table.held[slot].uid, scale) for slot, scale in seq.adapters)

    def _take_slot(self, seq: _Sequence) -> None:
        """The free slot whose cached tokens share the longest prefix with the prompt (that prefix
        is not fed again; one token at least is, for its logits) under the same adapters; without
        one, the slot freed longest ago, so that recent conversations keep their KV. When a running
        sequence's prompt shares more, its KV entries of that prefix are copied into the slot."""
        cached = self.engine.slot_tokens

        def shared(old: Sequence[int], lora_key: tuple) -> int:
            if lora_key != seq.lora_key:
                return 0
            new = seq.tokens
            n = min(len(old), len(new) - 1)
            same = next((i for i in range(n) if old[i] != new[i]), n)
            return same if same >= MIN_REUSE else 0

        slot = max(self._free_slots, key=lambda s: (shared(cached[s], self.engine.slot_adapters[s]),
                                                    -self._freed_at[s]))
        self._free_slots.remove(slot)
        seq.slot, seq.fed = slot, shared(cached[slot], self.engine.slot_adapters[slot])
        running = max(self._running.values(), default=None, key=lambda r: shared(_read_prompt(r), r.lora_key))
        copied = shared(_read_prompt(running), running.lora_key) if running is not None else 0
        if copied > seq.fed:
            self.engine.executor.copy_kv(running.slot, slot, copied)
            seq.fed = copied
        if not seq.preempted:
            seq.cached = seq.fed
        cached[slot] = ()  # rewritten from position `fed` on: valid again when the sequence ends

    def _reading_twin(self, seq: _Sequence) -> bool:
        """Whether a running sequence of the same adapters is still reading a prompt prefix of at
        least MIN_REUSE tokens it shares with this one: then this one waits, to copy it once read."""
        for running in self._running.values():
            if running.request.lora != seq.request.lora:
                continue
            prompt = running.request.prompt_ids
            n = min(len(prompt), len(seq.tokens) - 1)
            same = next((i for i in range(n) if prompt[i] != seq.tokens[i]), n)
            if same >= MIN_REUSE and running.fed < same:
                return True
        return False

    def _plan_step(self) -> list[tuple[_Sequence, int]]:
        """How many tokens of each running sequence go into this step: one per decoding sequence
        (plus its drafts), then prefill chunks sharing what is left of the step evenly."""
        decoding = [seq for seq in self._running.values() if seq.pending == 1]
        prefilling = [seq for seq in self._running.values() if seq.pending > 1]
        # rows: every decoding sequence's and, at most, one per prefill chunk that ends its prompt
        rows = self.engine.executor.max_logit_rows - len(decoding) - len(prefilling)
        budget = min(rows, (self.max_step_tokens - len(decoding)) // 2)
        if not prefilling:  # drafts that keep the step exact (a prefill chunk makes it a mat-mat anyway)
            budget = min(budget, self.engine.executor.exact_rows - len(decoding))
        self._draft(decoding, budget)
        take = {seq: 1 + len(seq.spec.drafts if seq.spec else ()) for seq in decoding}
        budget = self.max_step_tokens - sum(take.values())
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

    def _draft(self, decoding: list[_Sequence], budget: int) -> None:
        """Drafts for the decoding sequences that speculate, within `budget` tokens (and rows)."""
        wanted: list[tuple[_Sequence, int]] = []
        for seq in decoding:
            spec = seq.spec
            if spec is None:
                continue
            if spec.wait > 0:  # backing off: a plain decode step
                spec.wait -= 1
                continue
            k = min(spec.speculation.max_draft, seq.request.max_tokens - seq.generated - 1, budget)
            if k > 0:
                wanted.append((seq, k))
                budget -= k
        by_model = [(seq, k) for seq, k in wanted if seq.spec.speculation.method == "draft"]
        drafted = self.draft.propose([(seq.slot, seq.tokens, k) for seq, k in by_model]) if by_model else []
        for (seq, _), drafts in zip(by_model, drafted, strict=True):
            seq.spec.drafts = drafts
        for seq, k in wanted:
            if seq.spec.lookup is not None:
                seq.spec.drafts = seq.spec.lookup.propose(seq.tokens, k)
            if not seq.spec.drafts:
                seq.spec.verified(0)  # nothing to draft: back off

    def _submit(self, plan: list[tuple[_Sequence, int]]) -> _Step:
        """A step built on the host: the planned tokens of each sequence (a speculating one's last
        token and its drafts); the sequences whose chunk ends their input get logits rows, one, or
        one per fed token when they verify drafts."""
        tokens, positions, slots, rows, sampled, adapters = [], [], [], [], [], []
        for seq, n in plan:
            drafts = seq.spec.drafts if seq.spec else []
            known = n - len(drafts)
            tokens += seq.tokens[seq.fed:seq.fed + known] + drafts
            positions += range(seq.fed, seq.fed + n)
            slots += [seq.slot] * n
            adapters += [seq.adapters] * n
            if known == seq.pending:
                rows += range(len(tokens) - 1 - len(drafts), len(tokens))
                sampled.append((seq, 1 + len(drafts)))
        if not rows:  # executors return at least one row: sample one and leave it unread
            rows.append(len(tokens) - 1)
        batch = Batch(np.asarray(tokens, np.int32), np.asarray(positions, np.int32),
                      np.asarray(slots, np.int32), np.asarray(rows, np.int32), *lora_table(adapters))
        return self._launch(batch, sampled, plan, follow=False)

    def _can_follow(self, step: _Step) -> bool:
        """Whether the next step is known before `step`'s ids are: every running sequence is in it
        with one row (no drafts to verify, none to draft next), has had its first token read, is
        below its length limit, and no waiting request is due a slot (a free one, or one it takes
        from another tenant)."""
        if not self.engine.executor.run_ahead or self._inbox or isinstance(step.pending, _Failed):
            return False
        if self._next_admission() is not None:  # a waiting request takes a slot now
            return False
        if any(seq.request.reads_logits or seq.matcher is not None for seq in self._running.values()):
            return False  # sampled on the host, or under a mask the host makes from the last token
        # A first token goes out before anything queues behind it: each queued step is host work
        # (~1 ms in the page) that would come before reading it, i.e. before the time to first token.
        if any(seq.generated == 0 for seq, _ in step.sampled):
            return False
        return (len(step.sampled) == len(self._running)
                and all(n == 1 and seq.id in self._running and seq.requested < seq.request.max_tokens
                        and (seq.spec is None or not seq.spec.worth_a_pause(seq.tokens))
                        for seq, n in step.sampled))

    def _depth(self, seqs: list[_Sequence]) -> int:
        """Decode steps the next follow-up submit holds: up to the executor's steps_per_submit, none
        past a sequence's length limit or the context, nor past a speculating one's back-off."""
        room = [min(s.request.max_tokens - s.requested, self.engine.n_ctx - s.fed) for s in seqs]
        room += [s.spec.wait for s in seqs if s.spec is not None]
        return max(1, min(self.engine.executor.steps_per_submit, *room))

    def _submit_follow(self, step: _Step) -> _Step:
        """Decode tokens of every sequence of `step`, each the id the device samples the step before:
        `_depth` steps in one submit."""
        seqs = [seq for seq, _ in step.sampled]
        depth = self._depth(seqs)
        for seq in seqs:
            if seq.spec is not None and seq.spec.wait > 0:  # plain steps of its back-off
                seq.spec.wait -= min(depth, seq.spec.wait)
        n = len(seqs)
        batch = Batch(np.zeros(n, np.int32), np.array([s.fed for s in seqs], np.int32),
                      np.array([s.slot for s in seqs], np.int32), np.arange(n, dtype=np.int32),
                      *lora_table([s.adapters for s in seqs]))
        return self._launch(batch, step.sampled, [(s, 1) for s in seqs], follow=True, depth=depth)

    def _launch(self, batch: Batch, sampled: list[tuple[_Sequence, int]], fed: list[tuple[_Sequence, int]],
                follow: bool, depth: int = 1) -> _Step:
        # each row is sampled with its own sequence's parameters and step counter (on the device):
        # a verifying sequence's row i with the counter of the token it gives, as plain decoding would
        rows = [(seq.request.sampling, seq.requested + i) for seq, n in sampled for i in range(n)] or [(GREEDY, 0)]
        errors: dict[int, Exception] = {}
        try:
            if any(seq.request.reads_logits for seq, _ in sampled):
                pending = _HostSampled(self.engine.executor.forward(batch), sampled, rows)
                errors = pending.errors
            elif any(seq.matcher is not None for seq, _ in sampled):
                masks = _masks(sampled, errors)
                pending = self.engine.executor.submit_sample(batch, rows, follow=follow, masks=masks)
            elif depth > 1:
                pending = self.engine.executor.submit_sample(batch, rows, follow=follow, steps=depth)
            else:
                pending = self.engine.executor.submit_sample(batch, rows, follow=follow)
        except Exception as e:  # noqa: BLE001 - fail this step's sequences, keep serving the others
            pending = _Failed(e)
        for seq, n in fed:
            seq.fed += n * depth
        for seq, n in sampled:
            seq.requested += n * depth
        return _Step(pending, sampled, fed, errors, depth)

    def _receive(self, step: _Step) -> None:
        """Read a step's sampled ids and stream them (an error fails the step's sequences only)."""
        try:
            tokens = step.pending.result()
        except Exception as e:  # noqa: BLE001
            self._fail(step, e)
            return
        self._steps += 1
        logprobs, errors = getattr(step.pending, "logprobs", None), step.errors
        if step.depth > 1:  # decode steps, one row of every sequence each
            for i in range(step.depth):
                for (seq, _), token in zip(step.sampled, tokens[i * len(step.sampled):], strict=False):
                    if self._running.get(seq.id) is seq:
                        self._advance(seq, token)
            return
        at = 0
        for seq, n in step.sampled:
            sampled, at = tokens[at:at + n], at + n
            if self._running.get(seq.id) is not seq:  # finished or cancelled meanwhile
                continue
            if seq.id in errors:
                self._finish(seq, "error", error=errors[seq.id])
                continue
            if n == 1:
                self._advance(seq, sampled[0], logprobs[at - 1] if logprobs else None)
                continue
            # verified drafts: keep the accepted ones and the target's own next token; the KV
            # entries of the rejected drafts are rolled back (overwritten by the next step)
            accepted = accepted_prefix(seq.spec.drafts, sampled)
            seq.spec.verified(accepted)
            seq.fed -= n - 1 - accepted
            seq.requested = seq.generated
            for token in sampled[:accepted + 1]:
                if self._running.get(seq.id) is not seq:
                    break
                self._advance(seq, token)
                seq.requested = seq.generated

    def _fail(self, step: _Step, error: Exception) -> None:
        self._discard_in_flight()  # queued behind the failed step: they share its fate
        for seq, _ in step.fed:
            if self._running.get(seq.id) is seq:
                self._finish(seq, "error", error=error)

    def _discard_in_flight(self) -> None:
        while self._in_flight:
            try:
                self._in_flight.popleft().pending.result()
            except Exception:  # noqa: BLE001 - their sequences are being finished anyway
                pass

    def _advance(self, seq: _Sequence, token: int, logprob: TokenLogprob | None = None) -> None:
        """Stream the sequence's new token; finish on end of text, a stop sequence or length."""
        req = seq.request
        if seq.matcher is not None:
            seq.matcher.advance_token(token)  # sampled from its mask: it cannot fail
        if req.stop_at_eos and token in self.engine.tokenizer.eot_ids:
            self._finish(seq, "stop")
            return
        seq.generated += 1
        self._generated += 1
        text, stopped = seq.stop.feed(seq.decoder.feed(token))
        self._emit(seq, TokenEvent(token, text, seq.generated - 1, time.perf_counter() - seq.t0, logprob))
        if stopped:
            self._finish(seq, "stop", flush=False)
        elif seq.generated == req.max_tokens:
            self._finish(seq, "length")
        else:
            seq.tokens.append(token)

    def _finish(self, seq: _Sequence, reason: str, error: Exception | None = None, flush: bool = True) -> None:
        """Release the text still held back (unless a stop sequence cut it), free the slot, report."""
        if flush and reason in ("stop", "length"):
            text, _ = seq.stop.feed(seq.decoder.flush())
            tail = text + seq.stop.flush()
            if tail:
                self._emit(seq, TokenEvent(None, tail, seq.generated, time.perf_counter() - seq.t0))
        if self._running.pop(seq.id, None) is not None:
            # the slot holds the KV of every known token it was fed; a failed step's are unknown
            self._release_slot(seq, () if error else tuple(seq.tokens[:min(seq.fed, len(seq.tokens))]))
        self._release_adapters(seq)
        message = f"{type(error).__name__}: {error}" if error else None
        drafted, accepted = (seq.spec.drafted, seq.spec.accepted) if seq.spec else (0, 0)
        self._emit(seq, Finished(reason, len(seq.request.prompt_ids), seq.generated, message, seq.cached,
                                 drafted, accepted, error))

    def _release_slot(self, seq: _Sequence, cached: tuple[int, ...]) -> None:
        """Free the sequence's slot, which keeps the KV entries of `cached` for a later prompt."""
        self.engine.slot_tokens[seq.slot] = cached
        self.engine.slot_adapters[seq.slot] = seq.lora_key
        self._free_slots.append(seq.slot)
        self._freed_at[seq.slot] = self._steps
        self._release_adapters(seq)

    def _release_adapters(self, seq: _Sequence) -> None:
        if seq.adapters:  # a step still on the device may read them: it runs before any rewrite of theirs
            self.engine.adapters.release([slot for slot, _ in seq.adapters])
            seq.adapters = []

    def _emit(self, seq: _Sequence, event: Event) -> None:
        try:
            seq.sink(event)
        except Exception:  # noqa: BLE001 - nobody can read this sequence any more: stop it, serve the others
            self._inbox.append(("cancel", seq.id))


def _no_token_error(seq: _Sequence) -> InvalidRequest:
    return InvalidRequest("the output's grammar allows no token of the model's vocabulary here (its text so far is "
                          f"{len(seq.tokens) - len(seq.request.prompt_ids)} tokens)")


def _masks(sampled: list[tuple[_Sequence, int]], errors: dict[int, Exception]) -> list[np.ndarray | None]:
    """Each logit row's grammar mask (None: free), for the executor to sample under; a sequence
    whose grammar allows no token goes into `errors` (its row is left free and its token unread)."""
    masks: list[np.ndarray | None] = []
    for seq, n in sampled:  # one row each: a sequence with a grammar never speculates
        mask = seq.matcher.allowed_tokens() if seq.matcher is not None else None
        if mask is not None and not mask.any():
            errors[seq.id] = _no_token_error(seq)
            mask = None
        masks += [mask] * n
    return masks


class _HostSampled:
    """A step sampled on the host from its logits read back: for requests whose logits depend on
    their own tokens (logit_bias, penalties) or that report logprobs, on every executor alike (with
    a grammar too, its mask applies here). A sequence whose grammar allows no token here fails (`errors`). It
    costs the read of R x n_vocab floats (1 MiB a row for a 262k vocabulary) and no decoding ahead
    while such a request runs; the other rows of the step are sampled by the same rules as the
    GPU's sampler (sampling.py), so their tokens do not change."""

    def __init__(self, logits: np.ndarray, sampled: list[tuple[_Sequence, int]],
                 rows: list[tuple[SamplingParams, int]]) -> None:
        self.tokens: list[int] = []
        self.logprobs: list[TokenLogprob | None] = []
        self.errors: dict[int, Exception] = {}  # sequence id -> why it cannot go on
        at = 0
        for seq, n in sampled:  # one row each: a sequence that reads logits never speculates
            req = seq.request
            for i in range(n):
                row = logits[at + i]
                z = adjust_logits(row, req.rules, seq.tokens, len(req.prompt_ids)) if req.rules.active else row
                if seq.matcher is not None:
                    allowed = seq.matcher.allowed_tokens()
                    if not allowed.any():
                        self.errors[seq.id] = _no_token_error(seq)
                    z = np.where(allowed, z, np.float32(-np.inf))
                token = 0 if seq.id in self.errors else sample(z, *rows[at + i])
                self.tokens.append(token)
                self.logprobs.append(token_logprobs(row, token, req.logprobs) if req.logprobs is not None else None)
            at += n

    def result(self) -> list[int]:
        return self.tokens


class _Failed:
    """A step the executor refused at submission: its error surfaces when its ids are read."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    def result(self) -> list[int]:
        raise self.error
