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
"""

from __future__ import annotations

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
