"""Speculative decoding: drafters propose tokens, the target verifies them in one forward pass.

A sequence that speculates feeds its last token and k drafted ones in one step, with a logits row
for each; the scheduler samples every row with the sequence's own parameters and step counters
(row i: the counter of generated token g + i) and accepts drafts while the target's sample at row
i equals draft i + 1. The first sample that differs (or the one after the last draft) is kept too,
so a step yields 1 to k + 1 tokens, and the KV entries of the rejected drafts are rolled back (the
sequence's fed length lowered: the next step overwrites them).

Why this is exact at any temperature: drafts here are single tokens (a point distribution q = δ_d),
and for those the speculative-sampling rule "accept d with probability min(1, p(d)/q(d)) = p(d),
else sample from (p - q)+" gives each token with probability p; sampling t ~ p and accepting when
t == d is that rule. Since row i sees exactly the tokens accepted before it, and uses the random
number plain decoding would use for that token, the output is the token-for-token output of plain
decoding (up to float rounding of a several-row step against a one-row one).

Drafters:
- prompt lookup (`LookupDrafter`): the n-gram ending the text so far, found earlier in the prompt
  or the output, proposes the tokens that followed it there — free, and strong for edits,
  rewrites, code and extraction;
- a draft model (`DraftModel`): a smaller GGUF with the same vocabulary, decoding greedily in the
  same KV slots, all speculating sequences in one batch per draft step.

Back-off: a sequence whose drafter finds nothing, or whose step accepted fewer than half its
drafts, stops drafting for a few steps (doubling while nothing is accepted, up to `MAX_BACKOFF`)
and decodes plainly meanwhile, running ahead on a GPU like any other sequence. A lookup sequence
also runs ahead while the full n-gram ending its text (as read back so far) never occurred before:
free text rarely repeats a trigram, copied text does (`SpeculationState.worth_a_pause`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from .errors import InvalidRequest
from .plan import Batch
from .sampling import SamplingParams

if TYPE_CHECKING:
    from .engine import Engine
    from .tokenizer import Tokenizer

MAX_BACKOFF = 16  # steps a failing drafter waits at most before it drafts again
METHODS = ("lookup", "draft")
MAX_DRAFT = 32  # bounds of max_draft and ngram (the API schema and the CLI use them too)
MAX_NGRAM = 8


@dataclass(frozen=True)
class Speculation:
    """How a request drafts: "lookup" (n-grams of its own text) or "draft" (the draft model)."""

    method: str
    max_draft: int = 8  # k: tokens drafted per step at most
    ngram: int = 3  # lookup: the longest n-gram matched (down to 1)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise InvalidRequest(f"unknown speculation method {self.method!r} (choose one of {', '.join(METHODS)})")
        if not 1 <= self.max_draft <= MAX_DRAFT:
            raise InvalidRequest(f"max_draft must be in 1..{MAX_DRAFT}, got {self.max_draft}")
        if not 1 <= self.ngram <= MAX_NGRAM:
            raise InvalidRequest(f"ngram must be in 1..{MAX_NGRAM}, got {self.ngram}")


class LookupDrafter:
    """Prompt lookup over one sequence's tokens, with an index of every n-gram's latest end."""

    def __init__(self, ngram: int) -> None:
        self.ngram = ngram
        self.last_end: dict[tuple[int, ...], int] = {}  # n-gram -> end (exclusive) of its latest occurrence
        self.indexed = 0  # n-grams ending before this position are in the index

    def _index(self, tokens: Sequence[int]) -> None:
        """Index every n-gram ending before the last token (the suffix must not match itself)."""
        end = len(tokens)
        for e in range(max(self.indexed, 1), end):
            for n in range(1, min(self.ngram, e) + 1):
                self.last_end[tuple(tokens[e - n:e])] = e
        self.indexed = max(self.indexed, end)

    def propose(self, tokens: Sequence[int], k: int) -> list[int]:
        """What followed the latest earlier occurrence of the longest n-gram ending `tokens`."""
        self._index(tokens)
        end = len(tokens)
        for n in range(min(self.ngram, end - 1), 0, -1):
            at = self.last_end.get(tuple(tokens[end - n:end]))
            if at is not None and at < end:
                return list(tokens[at:at + k])
        return []

    def promising(self, tokens: Sequence[int]) -> bool:
        """Whether the full n-gram ending `tokens` occurred before: text that repeats itself. (Shorter
        matches are everywhere in free text: drafting from them is mostly rejected.)"""
        end = len(tokens)
        if end <= self.ngram:
            return False
        self._index(tokens)
        at = self.last_end.get(tuple(tokens[end - self.ngram:end]))
        return at is not None and at < end


@dataclass
class SpeculationState:
    """A speculating sequence's drafter, back-off and counts."""

    speculation: Speculation
    lookup: LookupDrafter | None = None
    wait: int = 0  # plain decode steps left before drafting again
    backoff: int = 1
    drafted: int = 0
    accepted: int = 0
    drafts: list[int] = field(default_factory=list)  # this step's drafts (fed after the last token)

    @classmethod
    def start(cls, speculation: Speculation) -> SpeculationState:
        lookup = LookupDrafter(speculation.ngram) if speculation.method == "lookup" else None
        return cls(speculation, lookup)

    def worth_a_pause(self, tokens: Sequence[int]) -> bool:
        """Whether drafting now is worth stopping the run-ahead for (a draft step needs the last
        token read back first): not while backing off; a lookup only where its text repeats itself
        (checked on `tokens`, those read back so far: the host's check is free, a pause is not)."""
        if self.wait > 0:
            return False
        return self.lookup is None or self.lookup.promising(tokens)

    def verified(self, accepted: int) -> None:
        """Count a verification. One that accepted at least half its drafts paid, and drafting goes
        on; any other waits `backoff` plain steps (a verifying step is not queued ahead of its read,
        so a few accepted tokens cost more than they give), doubling it while nothing is accepted."""
        drafted = len(self.drafts)
        self.drafted += drafted
        self.accepted += accepted
        if drafted and 2 * accepted >= drafted:
            self.backoff = 1
        else:
            self.wait = self.backoff
            if not accepted:
                self.backoff = min(2 * self.backoff, MAX_BACKOFF)
        self.drafts = []


def accepted_prefix(drafts: Sequence[int], sampled: Sequence[int]) -> int:
    """How many drafts the target's samples confirm: draft i is accepted while sampled[i] == it."""
    n = 0
    while n < len(drafts) and sampled[n] == drafts[n]:
        n += 1
    return n


def check_same_vocabulary(target: Tokenizer, draft: Tokenizer) -> None:
    """A draft model must spell every token id as the target does (and end text the same way)."""
    if target.vocab_size != draft.vocab_size:
        raise InvalidRequest(f"the draft model's vocabulary has {draft.vocab_size} tokens, the target's "
                             f"{target.vocab_size}: they must be the same vocabulary")
    differ = next((i for i, (a, b) in enumerate(zip(target.tokens, draft.tokens, strict=True)) if a != b), None)
    if differ is not None:
        raise InvalidRequest(f"the draft model's token {differ} is {draft.tokens[differ]!r}, the target's "
                             f"{target.tokens[differ]!r}: they must be the same vocabulary")


class DraftModel:
    """A small model that drafts for a target, greedily, in the same KV slot numbers; every
    speculating sequence of a step drafts in one batch per draft token."""

    def __init__(self, engine: Engine, target: Engine) -> None:
        check_same_vocabulary(target.tokenizer, engine.tokenizer)
        if engine.executor.n_slots < target.executor.n_slots:
            raise InvalidRequest(f"the draft model has {engine.executor.n_slots} KV slots, the target "
                                 f"{target.executor.n_slots}: it needs one per target slot")
        self.engine = engine
        self.n_ctx = engine.n_ctx

    def propose(self, wants: list[tuple[int, Sequence[int], int]]) -> list[list[int]]:
        """For each (slot, tokens, k): k greedy draft tokens continuing `tokens` (fewer near the
        draft's context end). The draft's KV cache keeps what it has in common with `tokens`."""
        ex, held = self.engine.executor, self.engine.slot_tokens
        greedy = SamplingParams()
        # catch up: feed each slot what it does not hold yet (all but the tokens in common)
        feeds = []
        for slot, tokens, k in wants:
            old = held[slot]
            n = min(len(old), len(tokens) - 1)
            common = next((i for i in range(n) if old[i] != tokens[i]), n)
            k = min(k, self.n_ctx - len(tokens))
            feeds.append((slot, list(tokens[common:]), common, k))
            held[slot] = tuple(tokens)
        drafts: list[list[int]] = [[] for _ in wants]
        live = [i for i, (_, _, _, k) in enumerate(feeds) if k > 0]
        if not live:
            return drafts
        tok, pos, slots, rows = [], [], [], []
        for i in live:
            slot, new, start, _ = feeds[i]
            tok += new
            pos += range(start, start + len(new))
            slots += [slot] * len(new)
            rows.append(len(tok) - 1)
        step = Batch(np.array(tok, np.int32), np.array(pos, np.int32), np.array(slots, np.int32),
                     np.array(rows, np.int32))
        while True:
            ids = ex.forward_sample(step, [(greedy, 0)] * len(live))
            for i, t in zip(live, ids, strict=True):
                drafts[i].append(t)
            live = [i for i in live if len(drafts[i]) < feeds[i][3]]
            if not live:
                return drafts
            # the drafts just made go in next, one per sequence, each after its sequence's last token
            for i in live:
                held[feeds[i][0]] = (*held[feeds[i][0]], drafts[i][-1])
            step = Batch(np.array([drafts[i][-1] for i in live], np.int32),
                         np.array([len(wants[i][1]) + len(drafts[i]) - 1 for i in live], np.int32),
                         np.array([feeds[i][0] for i in live], np.int32), np.arange(len(live), dtype=np.int32))
