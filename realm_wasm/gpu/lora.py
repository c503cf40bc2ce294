"""LoRA adapters on the device: adapter slots per input group of weights, and the step's token table.

The weights that read one input x (a layer's q, k and v read its attention norm; gate and up its
FFN norm) form a `LoraGroup`: one buffer, sized at load for `slots` adapters of rank up to `rank`
(shaders/lora_tokens.wgsl describes its layout), which loading an adapter writes its A and B
into and unloading zeroes the slot's ranks of. Each weight's kernel adds its rows' B·u (a
`LoraPool`: the weight's view of its group), u = scale · A·x: in a step that runs the mat-vec
(decode, up to the tuning's matvec_max_t tokens) the mat-vec computes its token's u itself
(shaders/lora_matvec.wgsl), so LoRA adds no dispatch to the step (at batch 1 each dispatch is
~5 µs of a ~900 µs step, more than its work); in a step that runs the mat-mat the group's A·x
kernel (shaders/lora_shrink.wgsl, one dispatch) computes u of every token, adapter and weight
once, and a kernel after each mat-mat adds B·u. Nothing is rebuilt when adapters change:
pipelines, bind groups and dispatch lists stay as they are. The step's table (`LoraTokens`: each
token's adapter slots and scales) is a uniform buffer shared by every group's kernels, written
with the step's inputs.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..lora import Adapter
from ..plan import LORA_PER_TOKEN, Batch
from . import compose
from .device import COPY_DST, STORAGE_RW, UNIFORM, Binding, Device, Dispatch, UnsupportedOnGPU

TOKEN_BYTES = 8 * 4  # vec4<i32> slots + vec4<f32> scales
SHRINK_LANES = 32  # invocations sharing one row of A (at most the workgroup): K / 4 / 32 vec4s each


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


class LoraGroup:
    """Adapter slots for the weights that read one input `x` ([T, k] f32): `parts` ((name, rows),
    in the order their kernels take them: a joined pair's two parts next to each other), and the
    A·x kernel that computes their u in steps of more than `matvec_max_t` tokens (the mat-mat's;
    mat-vecs compute their own). `workgroup` and `subgroups` shape that kernel."""

    def __init__(self, device: Device, tokens: LoraTokens, x: Binding, parts: Sequence[tuple[str, int]], k: int, *,
                 slots: int, rank: int, workgroup: int, subgroups: bool, matvec_max_t: int,
                 label: str = "") -> None:
        if not parts or rank % 4 or k % 4:
            raise ValueError("a LoRA group has parts, a rank and K that are multiples of 4")
        self.device, self.tokens, self.parts, self.k = device, tokens, tuple(parts), k
        self.slots, self.rank, self.matvec_max_t, self.label = slots, rank, matvec_max_t, label
        self.n_all = sum(rows for _, rows in parts)
        self.first_row = dict(zip((name for name, _ in parts),
                                  np.cumsum([0] + [rows for _, rows in parts[:-1]]).tolist(), strict=True))
        # floats: ranks, B [slots][n_all][rank], u [tokens][4][parts][rank], A [slots][parts][rank][k]
        self.ranks_len = round4(slots * len(parts))
        u_at = self.ranks_len + slots * self.n_all * rank
        self.a_at = u_at + tokens.max_tokens * LORA_PER_TOKEN * len(parts) * rank
        size = 4 * (self.a_at + slots * len(parts) * rank * k)
        limit = device.limits["max_storage_buffer_binding_size"]
        if size > limit:
            raise UnsupportedOnGPU(f"{label}: {slots} LoRA slots of rank {rank} need {size} bytes, more than "
                                   f"one storage binding holds ({limit}): ask for fewer adapters, a lower rank "
                                   f"or fewer max_tokens")
        # a new buffer is zeros: every slot's ranks are 0, no adapter
        self.side = (device.create_buffer(size, STORAGE_RW | COPY_DST, f"lora {label}"), 0, size)
        lanes = min(SHRINK_LANES, workgroup)
        consts = dict(K=k, WG=workgroup, LANES=lanes, LORA_AT=2, **self.consts())
        reduce = "reduce_lanes_subgroup.wgsl" if subgroups else "reduce_lanes_shared.wgsl"
        pipe = compose.pipeline(device, (reduce, "lora_tokens.wgsl", "lora_ax.wgsl", "lora_shrink.wgsl"), consts,
                                subgroups=subgroups, label=f"lora A·x {label}")
        bind_group = device.create_bind_group(pipe, [x, self.side, tokens.binding])
        quads = len(parts) * rank // 4  # a team computes 4 rows of u
        self.shrink = (pipe, bind_group, (-(-quads // (workgroup // lanes)), LORA_PER_TOKEN))

    def consts(self) -> dict[str, int]:
        """lora_tokens.wgsl's consts (besides LORA_AT, the binding the kernel gives the table)."""
        return dict(LORA_T=self.tokens.max_tokens, LORA_SLOTS=self.slots, LORA_GP=len(self.parts),
                    LORA_N_ALL=self.n_all, LORA_RANK=self.rank)

    def dispatches(self, t: int, lora: bool = False) -> list[Dispatch]:
        """The A·x kernel over t tokens, in steps whose tokens use adapters (`lora`) and that run the
        mat-mat; else nothing."""
        if not lora or t <= self.matvec_max_t:
            return []
        pipe, bind_group, (gx, gy) = self.shrink
        return [(pipe, bind_group, (gx, gy, t))]

    def pool(self, weights: Sequence[str]) -> LoraPool:
        """The side paths of a kernel computing these weights' rows (one, or a joined pair)."""
        names = [name for name, _ in self.parts]
        first = names.index(weights[0])
        if tuple(names[first:first + len(weights)]) != tuple(weights):
            raise ValueError(f"{' + '.join(weights)} are not adjacent parts of the LoRA group {self.label}")
        return LoraPool(self, first, self.parts[first:first + len(weights)])

    def write(self, slot: int, adapter: Adapter) -> None:
        """Put the adapter's pairs for the group's weights into `slot` (rank 0 for weights it leaves alone)."""
        p_count, write = len(self.parts), self.device.write_buffer
        b = np.zeros((self.n_all, self.rank), np.float32)
        ranks = np.zeros(p_count, np.float32)
        for p, (name, rows) in enumerate(self.parts):
            pair = adapter.pairs.get(name)
            if pair is not None:
                if pair.rank > self.rank:
                    raise ValueError(f"{name}: rank {pair.rank} is over the pool's {self.rank}")
                a = np.zeros((self.rank, self.k), np.float32)
                a[:pair.rank] = pair.a
                write(self.side[0], 4 * (self.a_at + (slot * p_count + p) * self.rank * self.k), a.tobytes())
                row = self.first_row[name]
                b[row:row + rows, :pair.rank] = pair.b
                ranks[p] = round4(pair.rank)  # the padding rows of A and columns of B are zeros
        if ranks.any():
            write(self.side[0], 4 * (self.ranks_len + slot * self.n_all * self.rank), b.tobytes())
        self._write_ranks(slot, ranks)

    def clear(self, slot: int) -> None:
        self._write_ranks(slot, np.zeros(len(self.parts), np.float32))

    def _write_ranks(self, slot: int, ranks: np.ndarray) -> None:
        self.device.write_buffer(self.side[0], 4 * slot * len(self.parts), ranks.tobytes())


class LoraPool:
    """One weight kernel's side paths: parts `first` (and `first + 1`, a joined pair) of `group`."""

    def __init__(self, group: LoraGroup, first: int, parts: Sequence[tuple[str, int]]) -> None:
        self.group, self.first, self.parts = group, first, tuple(parts)
        self.n, self.k = sum(rows for _, rows in parts), group.k

    def consts(self) -> dict[str, int]:
        """lora.wgsl's consts (besides LORA_AT, the binding the kernel gives the token table)."""
        first_rows = self.parts[0][1]
        return dict(self.group.consts(), LORA_PART0=self.first, LORA_P=len(self.parts), LORA_N=self.n,
                    LORA_SPLIT=first_rows if len(self.parts) == 2 else self.n,
                    LORA_ROW0=self.group.first_row[self.parts[0][0]])

    def bindings(self) -> list[Binding]:
        return [self.group.tokens.binding, self.group.side]
