"""Every workgroup, tile and split size of the GPU kernels, in one table per class of adapter.

Kernels take their shapes from here (`tuning_for(device)`), tests and benchmarks pass variants
(`dataclasses.replace(TUNING[False], ...)`). Measure with bench/bench_matvec.py and
bench/profile_step.py before changing a number; the comments say what each was measured against.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class Tile:
    """One mat-mat kernel shape: a workgroup computes tn weight rows x tt tokens, each thread an
    rn x rt register tile (4 or 8 each), reading K in bk-wide slices."""

    tn: int
    tt: int
    rn: int
    rt: int
    bk: int = 32

    def __post_init__(self) -> None:
        if {self.rn, self.rt} - {4, 8} or self.tn % self.rn or self.tt % self.rt or self.bk % 8:
            raise ValueError(f"{self}: register tiles are 4 or 8 wide, dividing the tile; bk a multiple of 8")

    @property
    def threads(self) -> int:
        return self.tn // self.rn * (self.tt // self.rt)

    def workgroup_bytes(self, f16: bool) -> int:
        """Workgroup memory of the weight and x tiles (rows padded by one vec4, see matmul.wgsl)."""
        return self.bk * (self.tn // 4 + self.tt // 4 + 2) * (8 if f16 else 16)


@dataclass(frozen=True)
class Tuning:
    """Kernel shapes for one class of adapter."""

    f16: bool  # f16 matmul arithmetic where the device has shader-f16 (CPU adapters emulate it: slower)
    # Elementwise, norm and RoPE kernels
    wg: int  # threads of an elementwise or norm workgroup (a power of two)
    # Attention
    attn_wg: int  # threads of an attention workgroup (at least head_dim / 4 and attn_split)
    attn_split: int  # KV-range chunks per token (workgroups in parallel) for short steps; 1: never
    attn_split_max_t: int  # steps of at most this many tokens split the KV range
    # Mat-vec: a team of `lanes` threads shares each weight row, `wg` threads (a power of two) per
    # workgroup; each team reads `rows` (1-8) weight rows at once, reusing each x load for all.
    matvec_wg: int
    matvec_lanes: int  # a power of two; short rows get fewer (see matmul.matvec_shape)
    matvec_lane_pairs: int  # the fewest pairs of 8-element groups a lane should get (0: keep `lanes`)
    matvec_rows: int
    # Rows per team for a weight with LoRA side paths: each workgroup computes its token's whole
    # u = A·x before its rows, so wider workgroups read A fewer times over (every size, small too).
    matvec_lora_rows: int
    # Weights of fewer elements are latency-bound (a few µs, whatever the kernel does with its
    # bytes): there the kernel runs as many threads as it can, one row per team of `lanes` lanes.
    matvec_small: int
    matvec_max_t: int  # steps with at most this many rows use the mat-vec kernel
    # Mat-mat tiles, most efficient first, each with the fewest workgroups a step's grid needs for
    # it to be chosen: the tiles' efficiency only shows when the GPU has enough of them to run at once.
    tiles: tuple[tuple[Tile, int], ...]
    # Sampling: threads of a sampler workgroup (at least sampling.TOP_K_CAP)
    sample_wg: int = 256
    # Types whose mat-vec walks K in 16-byte chunks of each block against x quantized to int8
    # (shaders/matvec_chunks.wgsl, matmul.CHUNK_SNIPPETS) where a team has a lane per chunk; the
    # others walk 8-element groups through their dequant snippet (shaders/matvec_groups.wgsl).
    matvec_chunks: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        powers = (self.wg, self.matvec_wg, self.matvec_lanes)
        rows = (self.matvec_rows, self.matvec_lora_rows)
        if any(v & (v - 1) for v in powers) or self.matvec_lanes > self.matvec_wg or not all(1 <= r <= 8 for r in rows):
            raise ValueError(f"{self}: wg, mat-vec wg and lanes are powers of two (lanes <= wg), rows 1 to 8")


# Keyed by `device.is_fallback_adapter`. CPU adapters (lavapipe, SwiftShader) pay a lot per barrier
# and per thread and gain nothing from more workgroups than cores, so they get small workgroups, no
# split attention, and fewer, fatter mat-vec threads: a row per thread (no reduction at all), 4 rows
# each; on lavapipe the mat-vec kernel wins up to 8 rows, the mat-mat one from 16.
#
# GPU mat-vec shapes measured on an H100 with bench/bench_matvec.py (weights cycled through DRAM):
# 2 rows per team of 32 lanes at 4096 x 4096 (a lane gets 8 pairs of groups), 2 rows per team of 8
# at 262144 x 640 (Q8_0: 91 µs, 59% of peak; 16 lanes 96 µs, 32 lanes 125 µs); small weights
# (2048 x 640: 4.9 µs) one row per team of 32 (2 rows: 5.0-8.2 µs, 8 lanes: 6.7 µs and up).
# The chunk walk (int8 x, 16-byte chunks of each block) was written because the K-quants' group
# walk decodes a block's scales for every 8 elements and converts every code to float. On an H200
# (bench_matvec.py --walk groups,chunks, 2026-12-03, docs/benchmarks.md) it took 14336 x 4096 from
# 149-328 GB/s to 548-1816 (Q5_K 272 -> 74 us, Q6_K 319 -> 27, Q8_0 190 -> 113, Q5_0 257 -> 24) and
# Q4_K 4096 x 14336 from 41 to 29 us; only Q4_K 4096 x 4096 lost (14.3 -> 15.0 us), so the GPU table
# gives it all five types: gemma-3-270m decode went from ~1,020 to ~1,160 tok/s. Their mat-mat
# keeps f32 x: rounding x there too (a rounding dispatch before each, tried 2026-12-04) cost 12% of
# prefill and did not make a token's logits independent of its step's kind, since every int8
# rounding turns f32 summation-order noise into whole rounding steps, layer after layer.
# CPU adapters keep the group walk, though on lavapipe the chunk walk at wg 32, 8 lanes, 4 rows
# ran Q4_K / Q6_K 1024 x 1024 and 4096 x 512 2-3x faster than this table's one-lane group walk
# (2-core machine, noisy): its int8 x moves results ~1e-3 from the numpy executor the CPU-adapter
# tests compare with, and SwiftShader (the page's fallback, slow barriers) is unmeasured.
# GPU mat-mat: a workgroup walks K serially, so a small grid takes ~30 us at K=640 (~80 us at
# K=2048) whatever T is, while the mat-vec kernel's time grows with T (each row re-reads the
# weights, from L2): mat-vec up to 12 rows (the crossover lay between 8 and 16 for most shapes with
# the previous mat-vec kernel). Above, 64 x 64 tiles do the most work per staged byte once the grid
# has a workgroup for most multiprocessors (32-deep slices once it has several), smaller tiles with
# deeper slices before. Split attention: 32 chunks per token for steps of up to 16 tokens.
TUNING = {
    False: Tuning(f16=True, wg=256, attn_wg=256, attn_split=32, attn_split_max_t=16,
                  matvec_wg=256, matvec_lanes=32, matvec_lane_pairs=4, matvec_rows=2, matvec_lora_rows=1,
                  matvec_small=1 << 22,
                  matvec_max_t=12,
                  tiles=((Tile(64, 64, 8, 4, 32), 512), (Tile(64, 64, 8, 4, 64), 80), (Tile(64, 32, 4, 4, 128), 80),
                         (Tile(32, 32, 4, 4, 128), 0)),
                  matvec_chunks=frozenset({"Q4_K", "Q5_K", "Q6_K", "Q8_0", "Q5_0"})),
    True: Tuning(f16=False, wg=64, attn_wg=64, attn_split=1, attn_split_max_t=0,
                 matvec_wg=32, matvec_lanes=1, matvec_lane_pairs=2, matvec_rows=4, matvec_lora_rows=4,
                 matvec_small=0,
                 matvec_max_t=8,
                 tiles=((Tile(64, 32, 4, 4), 0),)),
}


class _Adapter(Protocol):
    is_fallback_adapter: bool


def tuning_for(device: _Adapter) -> Tuning:
    return TUNING[device.is_fallback_adapter]
