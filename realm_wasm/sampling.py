"""Sampling rules shared by every executor.

The random number for step n of a sequence with seed s is `uniform(s, n)`, a counter-based hash
(PCG's output permutation) that a WGSL shader computes with the same u32 arithmetic, so the same
seed picks the same token on the CPU and on the GPU wherever their probabilities agree.

Given logits z and SamplingParams:
1. temperature == 0: argmax (lowest id on ties). Otherwise z / temperature.
2. keep the top_k largest, ties to the lower id; top_k is at most TOP_K_CAP (0 means TOP_K_CAP),
   because the GPU sampler selects candidates in registers;
3. softmax over those; keep the smallest most-probable prefix whose mass reaches top_p;
4. pick the first candidate whose cumulative (renormalized) mass exceeds uniform(seed, step).

Before that, a request's `LogitRules` (logit_bias and penalties, which depend on the sequence's own
tokens) adjust the row on the host (`adjust_logits`): the scheduler reads the logits back for the
steps of such a request, as it does for one that asks for logprobs (`token_logprobs`, computed from
the model's own logits before any adjustment, as llama-server reports them).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .errors import InvalidRequest

_M32 = 0xFFFFFFFF
TOP_K_CAP = 64


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not (self.temperature >= 0.0):
            raise InvalidRequest(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise InvalidRequest(f"top_k must be >= 0, got {self.top_k}")
        if not (0.0 < self.top_p <= 1.0):
            raise InvalidRequest(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def pcg_hash(x: int) -> int:
    state = (x * 747796405 + 2891336453) & _M32
    word = (((state >> ((state >> 28) + 4)) ^ state) * 277803737) & _M32
    return ((word >> 22) ^ word) & _M32


def uniform(seed: int, step: int) -> float:
    """A number in [0, 1) from (seed, step): 24 random bits, exact in f32."""
    return (pcg_hash(pcg_hash(seed & _M32) ^ (step & _M32)) >> 8) / float(1 << 24)


def sample(logits: np.ndarray, params: SamplingParams, step: int) -> int:
    """Pick one token id from a row of logits."""
    z = np.asarray(logits, dtype=np.float32)
    if params.greedy:
        return int(np.argmax(z))
    z = z / np.float32(params.temperature)
    k = min(params.top_k or TOP_K_CAP, TOP_K_CAP, len(z))
    # stable sort of -z keeps the lower id first among equal logits
    order = np.argsort(-z, kind="stable")[:k]
    p = np.exp(z[order] - z[order[0]])
    p /= p.sum()
    cut = min(int(np.searchsorted(np.cumsum(p), params.top_p * (1 - 1e-6))) + 1, k)
    p = p[:cut]
    cdf = np.cumsum(p) / p.sum()
    choice = int(np.searchsorted(cdf, uniform(params.seed, step), side="right"))
    return int(order[min(choice, cut - 1)])


MAX_TOP_LOGPROBS = 20  # OpenAI's limit for top_logprobs


@dataclass(frozen=True)
class LogitRules:
    """Adjustments of a row of logits that depend on the request and its sequence's tokens.

    Applied in this order (llama.cpp's: bias, then penalties), each only when set:
    - logit_bias: (token id, bias) pairs added to the logits (OpenAI: -100 bans, 100 forces);
    - repetition_penalty p (llama.cpp): every token among the last `repeat_last_n` tokens of the
      sequence, prompt included, has its logit divided by p when positive, multiplied when not;
    - presence_penalty a and frequency_penalty b (OpenAI): a token generated c > 0 times so far
      (the prompt does not count) loses a + c * b.
    """

    logit_bias: tuple[tuple[int, float], ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    repeat_last_n: int = 64

    def __post_init__(self) -> None:
        if not (self.repetition_penalty > 0.0):
            raise InvalidRequest(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.repeat_last_n < 0:
            raise InvalidRequest(f"repeat_last_n must be >= 0, got {self.repeat_last_n}")

    @property
    def active(self) -> bool:
        return bool(self.logit_bias or self.presence_penalty or self.frequency_penalty
                    or (self.repetition_penalty != 1.0 and self.repeat_last_n))


NO_RULES = LogitRules()


def adjust_logits(logits: np.ndarray, rules: LogitRules, context: Sequence[int], n_prompt: int) -> np.ndarray:
    """A copy of a row of logits with the rules applied; `context` is the sequence's tokens so
    far (prompt, then generated), the first `n_prompt` of them the prompt."""
    z = np.array(logits, dtype=np.float32)
    if rules.logit_bias:
        ids, bias = zip(*rules.logit_bias, strict=True)
        np.add.at(z, np.asarray(ids), np.asarray(bias, np.float32))
    if rules.repetition_penalty != 1.0 and rules.repeat_last_n:
        seen = np.unique(np.asarray(context[-rules.repeat_last_n:], np.int64))
        p = np.float32(rules.repetition_penalty)
        z[seen] = np.where(z[seen] > 0, z[seen] / p, z[seen] * p)
    if rules.presence_penalty or rules.frequency_penalty:
        generated = np.asarray(context[n_prompt:], np.int64)
        if len(generated):
            ids, counts = np.unique(generated, return_counts=True)
            penalty = rules.presence_penalty + counts * rules.frequency_penalty
            z[ids] -= penalty.astype(np.float32)
    return z


@dataclass(frozen=True)
class TokenLogprob:
    """The log-probability of a sampled token and the `top` most likely tokens (id, logprob),
    most likely first (ties to the lower id), under the model's own distribution."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...]


def token_logprobs(logits: np.ndarray, token_id: int, top: int) -> TokenLogprob:
    """log_softmax of the model's logits at `token_id`, and its `top` largest entries."""
    z = np.asarray(logits, dtype=np.float64)
    logp = z - (z.max() + np.log(np.exp(z - z.max()).sum()))
    best = np.argsort(-logp, kind="stable")[:top]
    return TokenLogprob(token_id, float(logp[token_id]), tuple((int(i), float(logp[i])) for i in best))
