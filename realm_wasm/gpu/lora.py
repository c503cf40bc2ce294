"""LoRA adapters on the device: a pool of adapter slots per adaptable weight, and the step's token table.

A `LoraPool` is one read-only buffer, sized at load for `slots` adapters of rank up to `rank`, that
the weight's kernels read (shaders/lora.wgsl describes its layout); loading an adapter writes its A
and B into a slot, unloading zeroes the slot's ranks. Nothing is rebuilt: pipelines, bind groups
and dispatch lists stay as they are. The step's table (`LoraTokens`: each token's adapter slots
and scales) is a uniform buffer shared by every pool's kernels, written with the step's inputs.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..lora import Adapter
from ..plan import LORA_PER_TOKEN, Batch
from .device import COPY_DST, STORAGE, UNIFORM, Binding, Device, UnsupportedOnGPU

TOKEN_BYTES = 8 * 4  # vec4<i32> slots + vec4<f32> scales


def round4(n: int) -> int:
    return -(-n // 4) * 4


class LoraTokens:
    """The step's adapter table for up to `max_tokens` tokens, one uniform binding."""

    def __init__(self, device: Device, max_tokens: int) -> None:
        size = TOKEN_BYTES * max_tokens
        limit = device.limits.get("max_uniform_buffer_binding_size", 65536)
        if size > limit:
            raise UnsupportedOnGPU(f"the LoRA table of {max_tokens} tokens needs a {size}-byte uniform binding; "
                                   f"this device allows {limit} (build the executor with fewer max_tokens)")
        self.device, self.max_tokens = device, max_tokens
        self.binding = (device.create_buffer(size, UNIFORM | COPY_DST, "lora tokens"), 0, size)
        self.clear_rows = 0  # leading rows known to hold no adapter

    def write(self, batch: Batch) -> None:
        """The batch's table (no adapter anywhere when batch.lora is None), written only when it changes
        something: a run of steps without adapters writes it once."""
        n = len(batch)
        if batch.lora is None:
            if self.clear_rows >= n:
                return
            table = np.zeros((n, 2 * LORA_PER_TOKEN), np.int32)
            table[:, :LORA_PER_TOKEN] = -1
            self.clear_rows = n
        else:
            table = np.concatenate([batch.lora.astype(np.int32),
                                    np.asarray(batch.lora_scale, np.float32).view(np.int32)], axis=1)
            self.clear_rows = 0
        self.device.write_buffer(self.binding[0], 0, np.ascontiguousarray(table).tobytes())


class LoraPool:
    """Adapter slots for one weight of `k` columns made of `parts` ((name, rows): one, or the two
    projections of a joined weight, rows of the first then of the second)."""

    def __init__(self, device: Device, tokens: LoraTokens, parts: Sequence[tuple[str, int]], k: int, *,
                 slots: int, rank: int, label: str = "") -> None:
        if not 1 <= len(parts) <= 2 or rank % 4 or k % 4:
            raise ValueError("a LoRA pool has one or two parts, a rank and K that are multiples of 4")
        self.device, self.tokens, self.parts, self.k = device, tokens, tuple(parts), k
        self.slots, self.rank = slots, rank
        self.n = sum(rows for _, rows in parts)
        # floats: ranks, then A [slots][parts][rank][k], then B [slots][n][rank]
        self.a_at = round4(slots * len(parts))
        self.b_at = self.a_at + slots * len(parts) * rank * k
        size = 4 * (self.b_at + slots * self.n * rank)
        limit = device.limits["max_storage_buffer_binding_size"]
        if size > limit:
            raise UnsupportedOnGPU(f"{label}: {slots} LoRA slots of rank {rank} need {size} bytes, more than one "
                                   f"storage binding holds ({limit}): ask for fewer adapters or a lower rank")
        # a new buffer is zeros: every slot's ranks are 0, no adapter
        self.binding = (device.create_buffer(size, STORAGE | COPY_DST, f"lora {label}"), 0, size)

    def consts(self) -> dict[str, int]:
        """lora.wgsl's consts (besides LORA_AT, the binding the kernel gives it)."""
        first_rows = self.parts[0][1]
        return dict(LORA_T=self.tokens.max_tokens, LORA_SLOTS=self.slots, LORA_P=len(self.parts), LORA_N=self.n,
                    LORA_SPLIT=first_rows if len(self.parts) == 2 else self.n, LORA_RANK=self.rank)

    def bindings(self) -> list[Binding]:
        return [self.tokens.binding, self.binding]

    def write(self, slot: int, adapter: Adapter) -> None:
        """Put the adapter's pairs for this weight's parts into `slot` (rank 0 for parts it leaves alone)."""
        p_count, write = len(self.parts), self.device.write_buffer
        b = np.zeros((self.n, self.rank), np.float32)
        ranks = np.zeros(p_count, np.float32)
        row = 0
        for p, (name, rows) in enumerate(self.parts):
            pair = adapter.pairs.get(name)
            if pair is not None:
                if pair.rank > self.rank:
                    raise ValueError(f"{name}: rank {pair.rank} is over the pool's {self.rank}")
                a = np.zeros((self.rank, self.k), np.float32)
                a[:pair.rank] = pair.a
                write(self.binding[0], 4 * (self.a_at + (slot * p_count + p) * self.rank * self.k), a.tobytes())
                b[row:row + rows, :pair.rank] = pair.b
                ranks[p] = round4(pair.rank)  # the padding rows of A and columns of B are zeros
            row += rows
        if ranks.any():
            write(self.binding[0], 4 * (self.b_at + slot * self.n * self.rank), b.tobytes())
        write(self.binding[0], 4 * slot * p_count, ranks.tobytes())

    def clear(self, slot: int) -> None:
        ranks = np.zeros(len(self.parts), np.float32)
        self.device.write_buffer(self.binding[0], 4 * slot * len(self.parts), ranks.tobytes())
