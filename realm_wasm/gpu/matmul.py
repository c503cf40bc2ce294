"""Fused dequant + matmul for every GGML type: y[T, N] = x[T, K] · W[N, K]ᵀ, W kept in its GGML bytes.

Two skeletons serve all types (shaders/matvec.wgsl for decode, shaders/matmul.wgsl for prefill and
batches); each type adds only its dequant snippet (shaders/dequant_<type>.wgsl). The mat-vec walks
K in one of two ways: 8-element groups through that snippet (shaders/matvec_groups.wgsl, every
type), or, for the types in `Tuning.matvec_chunks`, 16-byte chunks of each block against x quantized
to int8 in workgroup memory (shaders/matvec_chunks.wgsl + the type's chunk snippet, `CHUNK_SNIPPETS`).
A weight larger
than the device's storage-binding limit is uploaded as several row ranges, one buffer and one
dispatch each. Everything is built once at load time; `QuantMatmul.dispatches(t)` is what a step
puts into its command buffer.

A gated FFN, y = act(W_gate x) * (W_up x), runs as one QuantMatmul in GLU mode on the two weights
joined row-wise on the device (`concat_rows`): one mat-vec dispatch at decode, which computes
both dot products of an output row and writes act(g) * u. A mat-vec can also run the residual
RMSNorm of its output in its last workgroup (`ResidualNorm`, shaders/matvec_norm.wgsl), and two
projections of one input joined the same way (q and k) are one kernel writing two outputs.

With a `LoraPool` (gpu/lora.py) the weight's LoRA adapters are added as side paths B·u, u = A·x:
inside the mat-vec, which computes its token's u first (shaders/lora_matvec.wgsl, before its GLU,
norm tail or second region: no extra dispatch), and after the mat-mat by one more kernel
(shaders/lora_main.wgsl, u from the input group's A·x kernel) in steps whose tokens use any.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Protocol

from . import compose
from .device import (
    COPY_DST,
    COPY_SRC,
    STORAGE,
    BindGroup,
    Binding,
    Buffer,
    Device,
    Dispatch,
    Pipeline,
    UnsupportedOnGPU,
)
from .lora import LoraPool
from .tuning import Tile, Tuning, tuning_for


class QuantFormat(Protocol):
    """What a row of the quant table (`realm_wasm.quants.QuantType`) provides to the GPU kernels."""

    name: str
    block_size: int  # elements per block
    type_size: int  # bytes per block
    shader: str  # e.g. "dequant_q4_k.wgsl"


@dataclass(frozen=True)
class WeightChunk:
    buffer: Buffer
    row0: int  # first weight row held
    rows: int
    size: int  # bytes bound: rows * row bytes, padded to 4, then the type's lookup tables (table_tail)


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


def table_tail(quant: QuantFormat) -> bytes:
    """The lookup tables the type's kernels read from the end of each weight binding (the I-quant
    codebooks, see compose.TABLES); empty for most types."""
    return compose.table_tail(quant.shader) if quant.shader else b""


def padded(nbytes: int) -> int:
    return -(-nbytes // 4) * 4


def rows_per_binding(device: Device, quant: QuantFormat, k: int, max_binding: int | None = None) -> int:
    """Most rows of an [n, k] tensor one binding holds (`max_binding` bytes, default the device's
    max_storage_buffer_binding_size): `rows_within`."""
    return rows_within(max_binding or device.limits["max_storage_buffer_binding_size"], quant, k)


def rows_within(binding_bytes: int, quant: QuantFormat, k: int) -> int:
    """Most rows of an [n, k] tensor `binding_bytes` hold beside the type's table_tail, a multiple
    of the rows that end on a word boundary: chunks start at word-aligned tensor offsets, so
    word-aligned pieces stay aligned in them."""
    rb = row_bytes(quant, k)
    binding_bytes -= len(table_tail(quant))
    step = 4 // math.gcd(rb, 4)
    return binding_bytes // 4 * 4 // rb // step * step


def allocate_weight(
    device: Device, quant: QuantFormat, n: int, k: int, *, max_binding: int | None = None, label: str = ""
) -> GpuWeight:
    """Empty device buffers for an [n, k] tensor, as row ranges of at most `max_binding` bytes
    (default: the device's max_storage_buffer_binding_size). Fill them with `write_weight`."""
    rb = row_bytes(quant, k)
    per_chunk = rows_per_binding(device, quant, k, max_binding)
    if per_chunk <= 0:
        raise ValueError(f"{label or quant.name}: rows of {rb} bytes exceed the binding limit")
    tail = table_tail(quant)
    chunks = []
    for row0 in range(0, n, per_chunk):
        rows = min(per_chunk, n - row0)
        size = padded(rows * rb) + len(tail)
        # COPY_SRC: concat_rows copies weights on the device
        buf = device.create_buffer(size, STORAGE | COPY_DST | COPY_SRC, f"{label}[{row0}:{row0 + rows}]")
        if tail:
            device.write_buffer(buf, size - len(tail), tail)
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


def concat_rows(device: Device, a: GpuWeight, b: GpuWeight, label: str = "") -> GpuWeight | None:
    """One [a.n + b.n, k] weight holding a's rows then b's (a gated FFN's gate and up projections,
    for QuantMatmul's GLU mode), copied on the device. None where the two cannot be joined:
    different types or K, a's bytes not ending on a word boundary (buffer copies move whole
    words), or more rows than one binding holds (GLU reads a row's gate and up in one binding)."""
    if a.quant.name != b.quant.name or a.k != b.k:
        return None
    rb = row_bytes(a.quant, a.k)
    if a.n * rb % 4 or a.n + b.n > rows_per_binding(device, a.quant, a.k):
        return None
    joined = allocate_weight(device, a.quant, a.n + b.n, a.k, label=label)  # with its own table_tail
    dst = joined.chunks[0].buffer
    copies = [((c.buffer, 0, padded(c.rows * rb)), (dst, start + c.row0 * rb, padded(c.rows * rb)))
              for part, start in ((a, 0), (b, a.n * rb)) for c in part.chunks]
    device.submit([], copies=copies)
    return joined


def check_snippet(quant: QuantFormat) -> None:
    """The snippet declares its own block geometry; refuse a table row that disagrees with it."""
    try:
        compose.shader_source(quant.shader or "")
    except OSError:
        raise ValueError(f"{quant.name}: no GPU kernel reads this type (snippet {quant.shader!r} missing)") from None
    for snippet in (quant.shader, *CHUNK_SNIPPETS.get(quant.name, ())[-1:]):
        qk, nbytes = (snippet_const(snippet, c) for c in ("QK", "BLOCK_BYTES"))
        if nbytes * quant.block_size != qk * quant.type_size:
            raise ValueError(
                f"{quant.name}: table says {quant.type_size} bytes per {quant.block_size} elements, "
                f"{snippet} says {nbytes} per {qk}"
            )


# Types the mat-vec can walk in 16-byte chunks (shaders/matvec_chunks.wgsl; `Tuning.matvec_chunks`
# says which do): the files their weights are read through (blocks_vec4.wgsl for blocks of whole
# 16-byte multiples, else blocks.wgsl's u32 words), then their chunk snippet.
CHUNK_SNIPPETS = {
    "Q4_K": ("blocks_vec4.wgsl", "chunk_q4_k.wgsl"),
    "Q5_K": ("blocks_vec4.wgsl", "chunk_q5_k.wgsl"),
    "Q6_K": ("blocks.wgsl", "words16.wgsl", "chunk_q6_k.wgsl"),
    "Q8_0": ("blocks.wgsl", "words16.wgsl", "chunk_q8_0.wgsl"),
    "Q5_0": ("blocks.wgsl", "words16.wgsl", "chunk_q5_0.wgsl"),
}


def snippet_const(snippet: str, name: str) -> int:
    """The value of `const <name>: u32 = ...u;` in shader file `snippet`."""
    return int(re.search(rf"const {name}: u32 = (\d+)u;", compose.shader_source(snippet)).group(1))


def chunk_walk_bytes(k: int, wg: int) -> int:
    """Workgroup memory of a chunk-walk mat-vec over rows of k elements, before its tails: x as int8,
    a scale per 32 and a sum per 16 (matvec_chunks.wgsl), and the lanes' reduction slots."""
    return k + k // 32 * 4 + k // 16 * 4 + 2 * wg * 16


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


def matvec_shape(tune: Tuning, n: int, k: int, max_threads: int, glu: bool = False,
                 lora: bool = False) -> tuple[int, int, int]:
    """(threads per workgroup, lanes per row team, output rows per team) of the mat-vec kernel for
    an [n, k] weight: a small one gets one row per team of `matvec_lanes`; otherwise lanes halve
    until each gets `matvec_lane_pairs` pairs of 8-element groups (short rows would idle them). A
    weight with LoRA side paths (`lora`) gets at least `matvec_lora_rows`. A GLU team's gate and up rows
    share them (at most 4 each)."""
    wg = min(tune.matvec_wg, max_threads)
    lanes = min(tune.matvec_lanes, wg)
    small = n * k < tune.matvec_small
    while not small and lanes > 1 and k // 16 < lanes * tune.matvec_lane_pairs:
        lanes //= 2
    rows = 1 if small else tune.matvec_rows
    if lora:
        rows = max(rows, tune.matvec_lora_rows)
    return wg, lanes, max(1, min(4, rows // 2)) if glu else rows


@dataclass(frozen=True)
class ResidualNorm:
    """What a mat-vec can do after its rows (shaders/matvec_norm.wgsl): resid += rmsnorm(y) * w
    (resid += y with `w` None: a model without post-norms), then, with `then` = (w2, h),
    h = rmsnorm(resid) * w2 — ops.RmsNorm(residual=True, then=)."""

    w: Binding | None
    resid: Binding
    eps: float
    then: tuple[Binding, Binding] | None = None


class QuantMatmul:
    """y[t, :] = W · x[t, :] for t < T, for one weight and fixed x / y / row-count bindings.

    `rows` binds a uniform vec4<u32> whose .x the step sets to T (the mat-mat kernel reads it);
    `x` holds [T_max, K] f32, `y` receives [T_max, N] f32.

    With `glu` ("gelu" or "silu"), W is [2H, K], gate rows then up rows (`concat_rows`), in one
    binding, and y receives [T_max, H]: y[t, n] = act(W[n] · x[t]) * (W[H + n] · x[t]). The mat-vec
    kernel does it in one dispatch; bigger steps run the mat-mat kernel into a shared scratch
    [T_max, 2H] buffer, then ops.Glu.

    With `norm` (a weight in one binding), the mat-vec's last workgroup also runs that residual
    RMSNorm over y's rows (one dispatch); bigger steps run it as ops.RmsNorm after the mat-mat.

    With `second` = (n0, y2), W joins two projections of the same x (`concat_rows`: a layer's q
    and k): rows below n0 go to y ([T_max, n0]), the others to y2 ([T_max, N - n0]), which must
    lie after y in the same buffer (shaders/rows_out.wgsl). One dispatch computes both.

    With `lora`, the pool's adapters of each token are added to its rows (all N rows of the weight,
    as the pool's parts say): by the mat-vec itself, and by one LoRA kernel after the mat-mat when
    `dispatches(t, lora=True)` (a step whose tokens use adapters).
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
        glu: str | None = None,
        norm: ResidualNorm | None = None,
        second: tuple[int, Binding] | None = None,
        lora: LoraPool | None = None,
    ) -> None:
        check_snippet(weight.quant)
        if lora is not None and (lora.n, lora.k) != (weight.n, weight.k):
            raise ValueError(f"a LoRA pool of {lora.n}x{lora.k} for a {weight.n}x{weight.k} weight")
        self.lora = lora
        self.device, self.weight, self.x, self.y, self.rows = device, weight, x, y, rows
        self.tuning = tuning or tuning_for(device)
        self.f16 = self.tuning.f16 and "shader-f16" in device.features if f16 is None else f16
        self.subgroups = "subgroups" in device.features if subgroups is None else subgroups
        # width: output columns; the mat-mat kernel writes all N rows' sums to matmat_y
        self.glu, self.width, self.matmat_y, self.glu_op = glu, weight.n, y, None
        if glu:
            from . import ops  # ops builds on this module

            if glu not in ops.ACTIVATIONS or weight.n % 2 or len(weight.chunks) > 1:
                raise ValueError(f"GLU {glu!r} needs a known activation and an even row count in one binding")
            self.width = weight.n // 2
            size = y[2] // (4 * self.width) * weight.n * 4  # as many rows as y holds, both halves
            self.matmat_y = (ops.scratch(device, "glu gate+up", size), 0, size)
            self.glu_op = ops.Glu(device, self.matmat_y, self.matmat_y, y, width=self.width, act=glu,
                                  row_stride=weight.n, up_offset=self.width)
        # where rows land in y (rows_out.wgsl): all in y, or from n0 on in a second region (`second`)
        self.out = dict(Y_STRIDE=self.width, Y2_FROM=weight.n, Y2_AT=0, N_ALL=weight.n)
        self.y_checks = [("y", self.y, self.width)]
        if second:
            n0, (buf2, off2, size2) = second
            if glu or not 0 < n0 < weight.n or buf2 is not y[0] or off2 < y[1] + y[2] or off2 % 4:
                raise ValueError("a joined projection's second output must follow y in y's buffer")
            self.out.update(Y_STRIDE=n0, Y2_FROM=n0, Y2_AT=(off2 - y[1]) // 4)
            self.y_checks = [("y", self.y, n0), ("y2", second[1], weight.n - n0)]
            self.y = self.matmat_y = (y[0], y[1], off2 + size2 - y[1])  # one binding holds both
        self.norm, self.norm_op = norm, None
        if norm:
            from . import ops  # ops builds on this module

            if glu or second or len(weight.chunks) > 1:
                raise ValueError("a mat-vec's residual norm needs a plain weight in one binding")
            self.norm_op = ops.RmsNorm(device, y, norm.w, norm.resid, width=weight.n, group=weight.n, eps=norm.eps,
                                       residual=True, then=norm.then)
            size = 4 * self.tuning.matvec_max_t
            self.arrived = (ops.scratch(device, "matvec arrivals", size), 0, size)
            # unread weights are bound to zeros, the unwritten h to a scratch buffer
            zeros = (ops.scratch(device, "unused norm weight", 4 * weight.n), 0, 4 * weight.n)
            w2, h = norm.then or (zeros, (ops.scratch(device, "unused h", 16), 0, 16))
            self.norm_bindings = [norm.w or zeros, norm.resid, h, w2]
        self.matvec_shape = matvec_shape(self.tuning, weight.n, weight.k,
                                         device.limits["max_compute_invocations_per_workgroup"], bool(glu), bool(lora))
        self.chunked = self._chunk_walk_fits()  # the mat-vec walks in chunks against int8 x
        self.matvec = [self._matvec(c) for c in weight.chunks]
        self.tiles = fit_tiles(self.tuning.tiles, device.limits, self.f16, weight.k)
        # every tile a step may pick, built now: a pipeline compiled at first use would stall that
        # step (in the page, the first prompt's time to first token)
        self.matmat: dict[Tile, list[Launch]] = {tile: [self._matmat(c, tile) for c in weight.chunks]
                                                 for tile, _ in self.tiles}
        self.lora_after = self._lora_after() if lora else None

    def _grid(self, rows: int, rows_per_group: int) -> tuple[int, int]:
        """(x, y) workgroups covering `rows` output rows, `rows_per_group` each."""
        return fold_grid(-(-rows // rows_per_group), self.device.limits["max_compute_workgroups_per_dimension"])

    def _walk_parts(self) -> tuple[str, ...]:
        """The shader files that walk K: the weight reader, the type's snippet and the walk."""
        if self.chunked:
            return *CHUNK_SNIPPETS[self.weight.quant.name], "matvec_chunks.wgsl"
        return "blocks.wgsl", self.weight.quant.shader, "matvec_groups.wgsl"

    def _chunk_walk_fits(self) -> bool:
        """Whether this weight's mat-vec walks in chunks: its type is in the table's matvec_chunks,
        a team has a lane for each chunk of a block, and x as int8 fits the workgroup memory beside
        the norm tail's and the LoRA side path's."""
        name, (wg, lanes, _) = self.weight.quant.name, self.matvec_shape
        if name not in self.tuning.matvec_chunks or lanes < snippet_const(CHUNK_SNIPPETS[name][-1], "CHUNKS"):
            return False
        need = chunk_walk_bytes(self.weight.k, wg) + (4 * wg if self.norm else 0)
        if self.lora:
            lora = self.lora.consts()
            need += 4 * wg + 16 * lora["LORA_P"] * lora["LORA_RANK"]
        return need <= self.device.limits.get("max_compute_workgroup_storage_size", 16384)

    def _matvec(self, chunk: WeightChunk) -> Launch:
        wg, lanes, r = self.matvec_shape
        n = self.width if self.glu else chunk.rows  # GLU: output rows (one chunk, checked above)
        grid = self._grid(n, wg // lanes * r)
        consts = dict(K=self.weight.k, N=n, ROW0=chunk.row0, GRID_X=grid[0], R=r, LANES=lanes,
                      WG=wg, GLU=bool(self.glu), GELU=self.glu == "gelu", **self.out)
        reduce = "reduce_lanes_subgroup.wgsl" if self.subgroups else "reduce_lanes_shared.wgsl"
        entry = "matvec_norm.wgsl" if self.norm else "matvec_main.wgsl"
        hooks = ("lora_tokens.wgsl", "lora_ax.wgsl", "lora.wgsl", "lora_matvec.wgsl") if self.lora else (
            "lora_off.wgsl",)
        parts = (*self._walk_parts(), reduce, "glu_act.wgsl", "rows_out.wgsl", *hooks, "matvec.wgsl", entry)
        bindings = [(chunk.buffer, 0, chunk.size), self.x, self.y]
        if self.norm:
            consts.update(EPS=float(self.norm.eps), POST_NORM=self.norm.w is not None, THEN=self.norm.then is not None,
                          WGS=grid[0] * grid[1])
            bindings += [*self.norm_bindings, self.arrived]
        if self.lora:
            consts.update(LORA_AT=len(bindings), **self.lora.consts())
            bindings += self.lora.bindings()
            self._check_storage_bindings(len(bindings) - 1)  # the token table is a uniform
        label = " ".join(filter(None, ("matvec", self.weight.quant.name, f"{self.weight.n}x{self.weight.k}", self.glu,
                                       "chunks" if self.chunked else None,
                                       "+ norm" if self.norm else None, "+ lora" if self.lora else None)))
        pipe = compose.pipeline(self.device, parts, consts, f16=self.f16, subgroups=self.subgroups, label=label)
        return pipe, self.device.create_bind_group(pipe, bindings), grid

    def _matmat(self, chunk: WeightChunk, tile: Tile) -> Launch:
        grid = self._grid(chunk.rows, tile.tn)
        # GLU: all rows go to the [T, 2H] scratch
        out = dict(self.out, Y_STRIDE=self.weight.n) if self.glu else self.out
        consts = dict(K=self.weight.k, N=chunk.rows, ROW0=chunk.row0, GRID_X=grid[0],
                      TN=tile.tn, TT=tile.tt, RN=tile.rn, RT=tile.rt, BK=tile.bk, **out)
        parts = ("blocks.wgsl", self.weight.quant.shader, "rows_out.wgsl", "matmul.wgsl")
        label = f"matmul {self.weight.quant.name} {self.weight.n}x{self.weight.k} {tile}"
        pipe = compose.pipeline(self.device, parts, consts, f16=self.f16, label=label)
        w = (chunk.buffer, 0, chunk.size)
        return pipe, self.device.create_bind_group(pipe, [w, self.x, self.matmat_y, self.rows]), grid

    def _check_storage_bindings(self, count: int) -> None:
        limit = self.device.limits.get("max_storage_buffers_per_shader_stage", 8)
        if count > limit:
            raise UnsupportedOnGPU(f"a mat-vec with LoRA needs {count} storage buffers per shader stage; this "
                                   f"device allows {limit}: run without adapters or on another device")

    def _lora_after(self) -> Launch:
        """The LoRA kernel after the mat-mat: adds the side paths of every row where the mat-mat
        put it (the GLU's scratch, or both regions of a joined weight)."""
        wg = self.tuning.wg
        out = dict(self.out, Y_STRIDE=self.weight.n) if self.glu else self.out
        consts = dict(WG=wg, LORA_AT=1, **self.lora.consts(), **out)
        parts = ("rows_out.wgsl", "lora_tokens.wgsl", "lora.wgsl", "lora_main.wgsl")
        pipe = compose.pipeline(self.device, parts, consts, label=f"lora B·u {self.weight.n}x{self.weight.k}")
        bind_group = self.device.create_bind_group(pipe, [self.matmat_y, *self.lora.bindings()])
        return pipe, bind_group, (-(-self.weight.n // wg), 1)

    def tile(self, t: int) -> Tile:
        return pick_tile(self.tiles, self.weight.n, t)

    def dispatches(self, t: int, lora: bool = False) -> list[Dispatch]:
        """The dispatches computing T = t rows (the `rows` uniform must hold t when they run);
        `lora`: some of the step's tokens use adapters (the mat-vec checks per token itself)."""
        for name, (_, _, size), width in (("x", self.x, self.weight.k), *self.y_checks):
            if t * width * 4 > size:
                raise ValueError(f"{t} rows of {width} f32 do not fit the {size}-byte {name} binding")
        if t <= self.tuning.matvec_max_t:
            return [(pipe, bg, (t, gx, gy)) for pipe, bg, (gx, gy) in self.matvec]  # token-major: see matvec.wgsl
        tile = self.tile(t)
        tiles = -(-t // tile.tt)
        steps = [(pipe, bg, (gx, gy, tiles)) for pipe, bg, (gx, gy) in self.matmat[tile]]
        if lora and self.lora_after:
            pipe, bg, (gx, _) = self.lora_after
            steps.append((pipe, bg, (gx, t, 1)))
        after = self.glu_op or self.norm_op
        return steps + (after.dispatches(t) if after else [])
