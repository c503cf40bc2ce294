"""A model's forward pass as data: a list of kernel launches over named buffers.

A `Plan` is built once per model from its hyper-parameters (`models/*.py`) and run by any executor
(numpy `cpu.py`, wgpu-py / WebGPU `gpu/executor.py`). It says nothing about where it runs.

Buffers are activations with one row per token of the step (`rows="T"`) or one row per requested
logit (`rows="R"`). Step inputs are `tokens`, `positions`, `slots` (int32[T]) and `logit_rows`
(int32[R]), and optionally the LoRA adapters each token's matmuls add (`Batch.lora`, `lora.py`);
the output is `logits` [R, n_vocab]. Op kinds and their exact meaning:

| kind       | ins            | weights        | out = ...                                                   |
| ---------- | -------------- | -------------- | ----------------------------------------------------------- |
| embed      | tokens         | table          | table[tokens] * scale                                       |
| rmsnorm    | x              | w              | x / sqrt(mean(x², per group of `group`) + eps) * w          |
| matmul     | x              | W [N, K]       | x @ Wᵀ  (+ the token's adapters' LoRA side paths, rows "T") |
| bias       | x              | b [N]          | x + b (every row)                                           |
| glu        | x              | Wgate, Wup     | act(x @ Wgateᵀ) * (x @ Wupᵀ), act ∈ {gelu (tanh), silu}     |
|            |                |                | (each projection + its LoRA side paths)                     |
| rope       | x              |                | rotary embedding of each head at `positions` (in place)     |
| attention  | q, k, v        |                | store k, v in layer's KV cache at (slots, positions), then  |
|            |                |                | causal (sliding `window` if > 0) softmax(scale·q·kᵀ)·v,     |
|            |                |                | scores soft-capped to c·tanh(s / c) first if `softcap` c > 0 |
| softcap    | x              |                | cap · tanh(x / cap) (gemma2's final logits)                  |
| add        | a, b           |                | a + b                                                       |
| gather     | x              |                | x[logit_rows]                                               |
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .gguf import TensorInfo

OP_KINDS = ("embed", "rmsnorm", "matmul", "bias", "glu", "rope", "attention", "add", "gather", "softcap")
STEP_INPUTS = ("tokens", "positions", "slots", "logit_rows")
LORA_PER_TOKEN = 4  # adapters one token can apply at once (columns of Batch.lora)


@dataclass(frozen=True)
class Op:
    kind: str
    out: str
    ins: tuple[str, ...] = ()
    weights: tuple[str, ...] = ()
    params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in OP_KINDS:
            raise ValueError(f"unknown op kind {self.kind!r}")


@dataclass(frozen=True)
class KVSpec:
    n_layers: int
    n_kv_heads: int
    head_dim: int


@dataclass
class Plan:
    arch: str
    ops: list[Op]
    weights: dict[str, TensorInfo]  # every tensor the ops name
    buffers: dict[str, tuple[str, int]]  # activation name -> (rows: "T" | "R", width)
    kv: KVSpec
    n_vocab: int
    n_ctx_train: int

    def validate(self) -> None:
        """Every op reads only buffers that exist or were written before, and known weights."""
        written = set(STEP_INPUTS)
        for op in self.ops:
            for name in op.ins:
                if name not in written:
                    raise ValueError(f"op {op.kind}->{op.out} reads {name!r} before it is written")
            for w in op.weights:
                if w not in self.weights:
                    raise ValueError(f"op {op.kind}->{op.out} uses missing tensor {w!r}")
            if op.out not in self.buffers:
                raise ValueError(f"op {op.kind} writes undeclared buffer {op.out!r}")
            written.add(op.out)
        if "logits" not in written:
            raise ValueError("plan never writes 'logits'")


@dataclass
class Batch:
    """One forward step: T tokens from one or more sequences and which rows want logits.

    `lora` names, per token, the executor's adapter slots whose side paths its matmuls add (-1: no
    adapter in that column) and `lora_scale` the scale of each; None (the usual case) means no
    token uses an adapter, and the step costs what it costs without LoRA."""

    tokens: np.ndarray  # int32[T]
    positions: np.ndarray  # int32[T]
    slots: np.ndarray  # int32[T]
    logit_rows: np.ndarray  # int32[R]
    lora: np.ndarray | None = None  # int32[T, LORA_PER_TOKEN]: adapter slots, -1 = none
    lora_scale: np.ndarray | None = None  # float32[T, LORA_PER_TOKEN]

    @classmethod
    def for_sequence(cls, tokens: list[int], start: int, slot: int = 0,
                     all_logits: bool = False, adapters: Sequence[tuple[int, float]] = ()) -> Batch:
        """New tokens of one sequence starting at position `start`; logits for the last (or all);
        every token applies `adapters` ((adapter slot, scale) pairs)."""
        n = len(tokens)
        return cls(np.asarray(tokens, np.int32), np.arange(start, start + n, dtype=np.int32),
                   np.full(n, slot, np.int32),
                   np.arange(n, dtype=np.int32) if all_logits else np.array([n - 1], np.int32),
                   *lora_table([adapters] * n))

    def __len__(self) -> int:
        return len(self.tokens)


def head_input(plan: Plan) -> str:
    """The buffer the output head reads: the final hidden state (after the output norm) of each logit row."""
    return next(op.ins[0] for op in plan.ops if op.out == "logits")


def lora_table(rows: Sequence[Sequence[tuple[int, float]]]) -> tuple[np.ndarray | None, np.ndarray | None]:
    """`Batch.lora` and `Batch.lora_scale` from each token's (adapter slot, scale) pairs; (None, None)
    when no token has any."""
    if not any(rows):
        return None, None
    slots = np.full((len(rows), LORA_PER_TOKEN), -1, np.int32)
    scales = np.zeros((len(rows), LORA_PER_TOKEN), np.float32)
    for t, adapters in enumerate(rows):
        if len(adapters) > LORA_PER_TOKEN:
            raise ValueError(f"token {t} applies {len(adapters)} adapters (at most {LORA_PER_TOKEN})")
        for j, (slot, scale) in enumerate(adapters):
            slots[t, j], scales[t, j] = slot, scale
    return slots, scales
