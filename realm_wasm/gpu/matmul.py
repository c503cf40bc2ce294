"""Fused dequant + matmul for every GGML type: y[T, N] = x[T, K] · W[N, K]ᵀ, W kept in its GGML bytes.

Two skeletons serve all types (shaders/matvec.wgsl for decode, shaders/matmul.wgsl for prefill and
batches); each type adds only its dequant snippet (shaders/dequant_<type>.wgsl). A weight larger
than the device's storage-binding limit is uploaded as several row ranges, one buffer and one
dispatch each. Everything is built once at load time; `QuantMatmul.dispatches(t)` is what a step
puts into its command buffer.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Protocol

from . import compose
from .device import COPY_DST, STORAGE, BindGroup, Binding, Buffer, Device, Dispatch, Pipeline


class QuantFormat(Protocol):
    """What a row of the quant table (`realm_wasm.quants.QuantType`) provides to the GPU kernels."""

    name: str
    block_size: int  # elements per block
    type_size: int  # bytes per block
    shader: str  # e.g. "dequant_q4_k.wgsl"


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
    """Kernel shapes for one class of adapter (measure with bench/bench_matvec.py before changing)."""

    f16: bool  # f16 arithmetic where the device has shader-f16 (CPU adapters emulate it: slower)
    matvec_wg: int  # threads per mat-vec workgroup (a power of two)
    matvec_rows: int  # rows per mat-vec workgroup
    matvec_max_t: int  # steps with at most this many rows use the mat-vec kernel
    # Mat-mat tiles, most efficient first, each with the fewest workgroups a step's grid needs for
    # it to be chosen: the tiles' efficiency only shows when the GPU has enough of them to run at once.
    tiles: tuple[tuple[Tile, int], ...]


# Keyed by `device.is_fallback_adapter`: CPU adapters (lavapipe, SwiftShader) pay a lot per barrier
# and per thread, so they get fewer, fatter threads (on lavapipe the mat-vec kernel wins up to 8
# rows, the mat-mat one from 16). GPU rows measured on an H100 (132 multiprocessors) with
# bench/bench_matvec.py: a mat-mat workgroup walks K serially, so a small grid takes ~30 us at
# K=640 (~80 us at K=2048) whatever T is, while the mat-vec kernel's time grows with T (each row
# re-reads the weights, from L2): mat-vec up to 12 rows (the crossover lies between 8 and 16 for
# most shapes). Above, 64 x 64 tiles do the most work per staged byte once the grid has a
# workgroup for most multiprocessors (32-deep slices once it has several), smaller tiles with
# deeper slices before.
TUNING = {
    False: Tuning(f16=True, matvec_wg=256, matvec_rows=2, matvec_max_t=12,
                  tiles=((Tile(64, 64, 8, 4, 32), 512), (Tile(64, 64, 8, 4, 64), 80), (Tile(64, 32, 4, 4, 128), 80),
                         (Tile(32, 32, 4, 4, 128), 0))),
    True: Tuning(f16=False, matvec_wg=32, matvec_rows=16, matvec_max_t=8, tiles=((Tile(64, 32, 4, 4), 0),)),
}


@dataclass(frozen=True)
class WeightChunk:
    buffer: Buffer
    row0: int  # first weight row held
    rows: int
    size: int  # bytes bound (rows * row bytes, padded to 4)


@dataclass(frozen=True)
class GpuWeight:
    """An [n, k] GGML tensor on the device, as row ranges that each fit one storage binding."""

    quant: QuantFormat
    n: int
    k: int
    chunks: tuple[WeightChunk, ...]


def row_bytes(quant: QuantFormat, k: int) -> int:
    """Bytes per weight row; the kernels take K in whole blocks and whole 8-element groups."""
    if k % quant.block_size or k % 8:
        raise ValueError(f"{quant.name}: K={k} must be a multiple of {quant.block_size} and of 8")
    return k // quant.block_size * quant.type_size


def allocate_weight(
    device: Device, quant: QuantFormat, n: int, k: int, *, max_binding: int | None = None, label: str = ""
) -> GpuWeight:
    """Empty device buffers for an [n, k] tensor, as row ranges of at most `max_binding` bytes
    (default: the device's max_storage_buffer_binding_size). Fill them with `write_weight`."""
    rb = row_bytes(quant, k)
    limit = (max_binding or device.limits["max_storage_buffer_binding_size"]) // 4 * 4
    # Chunks start at word-aligned tensor offsets, so word-aligned pieces stay aligned in them.
    step = 4 // math.gcd(rb, 4)
    per_chunk = limit // rb // step * step
    if per_chunk == 0:
        raise ValueError(f"{label or quant.name}: {step} row(s) of {rb} bytes exceed the binding limit {limit}")
    chunks = []
    for row0 in range(0, n, per_chunk):
        rows = min(per_chunk, n - row0)
        size = -(-rows * rb // 4) * 4
        buf = device.create_buffer(size, STORAGE | COPY_DST, f"{label}[{row0}:{row0 + rows}]")
        chunks.append(WeightChunk(buf, row0, rows, size))
    return GpuWeight(quant, n, k, tuple(chunks))


def write_weight(device: Device, weight: GpuWeight, offset: int, data: bytes | memoryview) -> None:
    """Write bytes [offset, offset + len(data)) of the tensor's GGML data (a streamed piece).
    Pieces start and end on 4-byte boundaries, except that the last one ends with the tensor."""
    data = memoryview(data).cast("B")
    rb = row_bytes(weight.quant, weight.k)
    end = offset + len(data)
    if offset % 4 or (end % 4 and end != weight.n * rb) or end > weight.n * rb:
        raise ValueError(f"piece [{offset}, {end}) of a {weight.n * rb}-byte tensor is not word-aligned or overruns")
    for c in weight.chunks:
        lo, hi = max(offset, c.row0 * rb), min(end, (c.row0 + c.rows) * rb)
        if lo >= hi:
            continue
        piece, at = data[lo - offset : hi - offset], lo - c.row0 * rb
        aligned = len(piece) // 4 * 4  # write_buffer takes whole words: the tensor's tail goes padded
        if aligned:
            device.write_buffer(c.buffer, at, piece[:aligned])
        if aligned < len(piece):
            device.write_buffer(c.buffer, at + aligned, bytes(piece[aligned:]).ljust(4, b"\0"))


def upload_weight(
    device: Device,
    quant: QuantFormat,
    n: int,
    k: int,
    data: bytes | memoryview,
    *,
    max_binding: int | None = None,
    label: str = "",
) -> GpuWeight:
    """`allocate_weight` + `write_weight` of the whole tensor at once."""
    data = memoryview(data).cast("B")
    if len(data) != n * row_bytes(quant, k):
        raise ValueError(f"{label or quant.name}: {len(data)} bytes given, {n}x{k} needs {n * row_bytes(quant, k)}")
    weight = allocate_weight(device, quant, n, k, max_binding=max_binding, label=label)
    write_weight(device, weight, 0, data)
    return weight


def check_snippet(quant: QuantFormat) -> None:
    """The snippet declares its own block geometry; refuse a table row that disagrees with it."""
    try:
        text = compose.shader_source(quant.shader or "")
    except OSError:
        raise ValueError(f"{quant.name}: no GPU kernel reads this type (snippet {quant.shader!r} missing)") from None
    qk, nbytes = (int(re.search(rf"const {c}: u32 = (\d+)u;", text).group(1)) for c in ("QK", "BLOCK_BYTES"))
    if nbytes * quant.block_size != qk * quant.type_size:
        raise ValueError(
            f"{quant.name}: table says {quant.type_size} bytes per {quant.block_size} elements, "
            f"{quant.shader} says {nbytes} per {qk}"
        )


def fold_grid(workgroups: int, max_dim: int) -> tuple[int, int]:
    """(x, y) workgroup counts covering `workgroups`, each within the per-dimension limit."""
    gy = -(-workgroups // max_dim)
    return -(-workgroups // gy), gy


Launch = tuple[Pipeline, BindGroup, tuple[int, int]]  # a dispatch less its z count


TileTable = list[tuple[Tile, int]]  # (tile, fewest workgroups), as in Tuning.tiles


def fit_tiles(tiles: TileTable, limits: dict[str, int], f16: bool, k: int) -> TileTable:
    """The tiles a device can run for rows of k elements: slices as deep as K divides (K is a
    multiple of 8, see row_bytes) and workgroup memory allows; tiles with too many threads dropped."""
    memory = limits.get("max_compute_workgroup_storage_size", 16384)  # WebGPU's defaults
    threads = limits.get("max_compute_invocations_per_workgroup", 256)
    fitted = []
    for tile, least in tiles:
        tile = dataclasses.replace(tile, bk=math.gcd(tile.bk, k))
        while tile.workgroup_bytes(f16) > memory and tile.bk > 8:
            tile = dataclasses.replace(tile, bk=tile.bk // 2)
        if tile.workgroup_bytes(f16) <= memory and tile.threads <= threads:
            fitted.append((tile, least))
    if not fitted:
        raise ValueError(f"no mat-mat tile of {tiles} fits this device's workgroup limits")
    return fitted


def pick_tile(tiles: TileTable, n: int, t: int) -> Tile:
    """The mat-mat tile for t rows of an n-row weight: the first whose grid has the workgroups it
    needs, else the one with the most."""
    def groups(tile: Tile) -> int:
        return -(-n // tile.tn) * -(-t // tile.tt)

    return next((tile for tile, least in tiles if groups(tile) >= least),
                max((tile for tile, _ in tiles), key=groups))


class QuantMatmul:
    """y[t, :] = W · x[t, :] for t < T, for one weight and fixed x / y / row-count bindings.

    `rows` binds a uniform vec4<u32> whose .x the step sets to T (the mat-mat kernel reads it);
    `x` holds [T_max, K] f32, `y` receives [T_max, N] f32.
    """

    def __init__(
        self,
        device: Device,
        weight: GpuWeight,
        x: Binding,
        y: Binding,
        rows: Binding,
        *,
        f16: bool | None = None,
        subgroups: bool | None = None,
        tuning: Tuning | None = None,
    ) -> None:
        check_snippet(weight.quant)
        self.device, self.weight, self.x, self.y, self.rows = device, weight, x, y, rows
        self.tuning = tuning or TUNING[device.is_fallback_adapter]
        self.f16 = self.tuning.f16 and "shader-f16" in device.features if f16 is None else f16
        self.subgroups = "subgroups" in device.features if subgroups is None else subgroups
        self.matvec = [self._matvec(c) for c in weight.chunks]
        self.tiles = fit_tiles(self.tuning.tiles, device.limits, self.f16, weight.k)
        self.matmat: dict[Tile, list[Launch]] = {}  # built at first use: most steps need one or two tiles

    def _consts(self, chunk: WeightChunk, rows_per_group: int) -> tuple[dict[str, int], tuple[int, int]]:
        """Shape constants of one chunk and its (x, y) grid of workgroups of `rows_per_group` rows."""
        grid = fold_grid(-(-chunk.rows // rows_per_group), self.device.limits["max_compute_workgroups_per_dimension"])
        shape = {"K": self.weight.k, "N": chunk.rows, "Y_STRIDE": self.weight.n, "ROW0": chunk.row0}
        return {**shape, "GRID_X": grid[0]}, grid

    def _matvec(self, chunk: WeightChunk) -> Launch:
        tune, k = self.tuning, self.weight.k
        consts, grid = self._consts(chunk, tune.matvec_rows)
        # Short rows (e.g. K=640: 80 groups of 8) would idle most of a wide workgroup.
        consts.update(R=tune.matvec_rows, WG=min(tune.matvec_wg, max(32, 1 << (k // 8 - 1).bit_length())))
        reduce = "reduce_subgroup.wgsl" if self.subgroups else "reduce_shared.wgsl"
        parts = ("blocks.wgsl", self.weight.quant.shader, reduce, "matvec.wgsl")
        label = f"matvec {self.weight.quant.name} {self.weight.n}x{k}"
        pipe = compose.pipeline(self.device, parts, consts, f16=self.f16, subgroups=self.subgroups, label=label)
        w = (chunk.buffer, 0, chunk.size)
        return pipe, self.device.create_bind_group(pipe, [w, self.x, self.y]), grid

    def _matmat(self, chunk: WeightChunk, tile: Tile) -> Launch:
        consts, grid = self._consts(chunk, tile.tn)
        consts.update(TN=tile.tn, TT=tile.tt, RN=tile.rn, RT=tile.rt, BK=tile.bk)
        parts = ("blocks.wgsl", self.weight.quant.shader, "matmul.wgsl")
        label = f"matmul {self.weight.quant.name} {self.weight.n}x{self.weight.k} {tile}"
        pipe = compose.pipeline(self.device, parts, consts, f16=self.f16, label=label)
        w = (chunk.buffer, 0, chunk.size)
        return pipe, self.device.create_bind_group(pipe, [w, self.x, self.y, self.rows]), grid

    def tile(self, t: int) -> Tile:
        return pick_tile(self.tiles, self.weight.n, t)

    def dispatches(self, t: int) -> list[Dispatch]:
        """The dispatches computing T = t rows (the `rows` uniform must hold t when they run)."""
        for name, (_, _, size), width in (("x", self.x, self.weight.k), ("y", self.y, self.weight.n)):
            if t * width * 4 > size:
                raise ValueError(f"{t} rows of {width} f32 do not fit the {size}-byte {name} binding")
        if t <= self.tuning.matvec_max_t:
            return [(pipe, bg, (gx, gy, t)) for pipe, bg, (gx, gy) in self.matvec]
        tile = self.tile(t)
        if tile not in self.matmat:
            self.matmat[tile] = [self._matmat(c, tile) for c in self.weight.chunks]
        tiles = -(-t // tile.tt)
        return [(pipe, bg, (gx, gy, tiles)) for pipe, bg, (gx, gy) in self.matmat[tile]]
