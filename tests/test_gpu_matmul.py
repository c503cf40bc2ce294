"""Fused dequant + matmul kernels on the native device (lavapipe in CI) against a numpy oracle.

The oracle dequantizes with the `gguf` package (independent of Realm's table and shaders) and
multiplies in float64. Tolerances are relative to sum_k |w[n,k] * x[t,k]|, the scale of the
rounding error of any summation order:
- f32 path: only the summation order differs from the oracle: measured <= 1e-7; bound 1e-5.
- f16 path: w and x are rounded to f16 (2^-11 each, so ~1e-3 per product) and each 32-wide
  slice is summed in f16; the errors have random signs: measured <= 4e-4; bound 2e-3.
A wrong nibble, scale or element order gives errors of order 1e-2 and above.
Mat-vecs that walk in chunks (`QuantMatmul.chunked`: the K-quants on the GPU table) multiply x
rounded to int8 per 32 elements, by the rule `int8_x` restates; the oracle then takes that x, and
the same bounds hold (measured <= 3e-8). Against exact x they are off by ~1e-3 (x's rounding).
"""

from __future__ import annotations

import asyncio
import dataclasses

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from realm_wasm.gpu import compose, ops  # noqa: E402
from realm_wasm.gpu.device import STORAGE_RW, UNIFORM_RW  # noqa: E402
from realm_wasm.gpu.matmul import (  # noqa: E402
    CHUNK_SNIPPETS,
    QuantMatmul,
    ResidualNorm,
    allocate_weight,
    chunk_walk_bytes,
    concat_rows,
    fit_tiles,
    fold_grid,
    matvec_shape,
    pick_tile,
    upload_weight,
    write_weight,
)
from realm_wasm.gpu.tuning import TUNING, Tile  # noqa: E402
from realm_wasm.quants import GRIDS, QUANT_TYPES, QUANTS_BY_NAME  # noqa: E402

G = gguf.GGMLQuantizationType
TYPES = tuple(qt.name for qt in QUANT_TYPES if qt.shader)  # every type the table calls GPU-readable
QUANTIZED_BY_GGUF = {"F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "TQ1_0", "TQ2_0", "MXFP4"}
# The other types get random bytes (every bit pattern) with their f16 scales made finite and small.
F16_SCALES = {"Q8_1": (0, 2), "Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2),
              "Q6_K": (208,), "IQ4_NL": (0,), "IQ4_XS": (0,), "IQ2_XXS": (0,), "IQ2_XS": (0,), "IQ2_S": (0,),
              "IQ3_XXS": (0,), "IQ3_S": (0,), "IQ1_S": (0,), "Q1_0": (0,), "Q2_0": (0,)}
# K per block size: floats get a K that is not a multiple of 32 (the mat-mat's 8-wide K slices).
K_FOR_BLOCK = {1: 200, 32: 160, 64: 320, 128: 384, 256: 512}
N = 37  # not a multiple of any workgroup's row count or tile
TOL = {False: 1e-5, True: 2e-3}


def random_weight(name: str, n: int, k: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(GGML bytes [n, row_bytes], float64 oracle [n, k])."""
    qt = QUANTS_BY_NAME[name]
    blocks = n * k // qt.block_size
    if name in QUANTIZED_BY_GGUF:
        raw = gguf.quants.quantize(rng.standard_normal((n, k), dtype=np.float32), G[name]).view(np.uint8)
    else:
        raw = rng.integers(0, 256, (blocks, qt.type_size), dtype=np.uint8)
        for at in F16_SCALES.get(name, ()):
            raw[:, at : at + 2] = rng.uniform(-0.05, 0.05, (blocks, 1)).astype(np.float16).view(np.uint8)
        if name == "Q8_K":
            raw[:, :4] = rng.uniform(-0.01, 0.01, (blocks, 1)).astype(np.float32).view(np.uint8)
        if name == "IQ1_M":  # its f16 d is the top nibbles of the four u16 scale words at 48..55
            d = rng.uniform(-0.05, 0.05, blocks).astype(np.float16).view(np.uint16)
            words = raw[:, 48:].copy().view("<u2")
            words[:] = words & 0x0FFF | (d[:, None] >> np.arange(0, 16, 4, dtype=np.uint16) & 0xF) << 12
            raw[:, 48:] = words.view(np.uint8)
        if name == "NVFP4":  # UE4M3 scales up to 0.94 (exponents 0..7, bit 7 ignored), some 0x7F (read as 0)
            scales = rng.integers(0, 0x40, (blocks, 4)) | rng.integers(0, 2, (blocks, 4)) << 7
            raw[:, :4] = np.where(rng.random((blocks, 4)) < 0.1, 0x7F, scales)
    return raw.reshape(n, -1), oracle_dequant(name, raw.reshape(blocks, qt.type_size)).reshape(n, k)


def oracle_dequant(name: str, blocks: np.ndarray) -> np.ndarray:
    # gguf has no Q8_K, and its Q8_1 is an old 40-byte layout; both are d * int8 codes. It cannot
    # dequantize Q1_0 (d * +-1 by bit j of the bytes after d) nor Q2_0 (d * (q - 1) by bit pair j).
    d = blocks[:, :2].view(np.float16).astype(np.float64)
    if name == "Q8_1":
        return d * blocks[:, 4:].view(np.int8)
    if name == "Q8_K":
        return blocks[:, :4].view(np.float32).astype(np.float64) * blocks[:, 4:260].view(np.int8)
    if name == "Q1_0":
        return d * np.where(np.unpackbits(blocks[:, 2:], axis=1, bitorder="little"), 1.0, -1.0)
    if name == "Q2_0":
        codes = blocks[:, 2:, None] >> np.array([0, 2, 4, 6], np.uint8) & 3
        return d * (codes.reshape(len(blocks), -1).astype(np.float64) - 1)
    return gguf.quants.dequantize(blocks, G[name]).astype(np.float64)


def int8_x(x: np.ndarray) -> np.ndarray:
    """x as the chunk walk multiplies it (shaders/matvec_chunks.wgsl): each 32 elements rounded to
    the nearest multiple of amax / 127 (halves to even), in float32 as the kernel computes them."""
    blocks = x.astype(np.float32).reshape(len(x), -1, 32)
    amax = np.abs(blocks).max(axis=-1, keepdims=True)
    inv = np.float32(127) / np.where(amax > 0, amax, np.float32(1))
    return (np.rint(blocks * inv) * (amax / np.float32(127))).reshape(x.shape).astype(np.float64)


class Case:
    """One weight on the device with x / y / row-count buffers sized for `t_max` rows."""

    def __init__(self, gpu, name: str, n: int, k: int, t_max: int, seed: int = 0, piece: int = 0, **alloc) -> None:
        rng = np.random.default_rng(seed)
        self.gpu, self.n, self.k = gpu, n, k
        raw, self.w = random_weight(name, n, k, rng)
        self.weight = allocate_weight(gpu, QUANTS_BY_NAME[name], n, k, label=name, **alloc)
        data = raw.tobytes()
        for at in range(0, len(data), piece or len(data)):  # as a streaming loader would
            write_weight(gpu, self.weight, at, data[at : at + (piece or len(data))])
        self.x = rng.standard_normal((t_max, k), dtype=np.float32)
        xbuf = gpu.create_buffer(self.x.nbytes, STORAGE_RW)
        gpu.write_buffer(xbuf, 0, self.x.tobytes())
        self.y = gpu.create_buffer(t_max * n * 4, STORAGE_RW)
        self.rows = gpu.create_buffer(16, UNIFORM_RW)
        self.bindings = ((xbuf, 0, self.x.nbytes), (self.y, 0, t_max * n * 4), (self.rows, 0, 16))

    def matmul(self, device=None, **options) -> QuantMatmul:
        return QuantMatmul(device or self.gpu, self.weight, *self.bindings, **options)

    def run(self, mm: QuantMatmul, t: int, lora: bool = False, before: list | tuple = ()) -> np.ndarray:
        """y[:t] after one step of t rows (after the dispatches `before`, e.g. LoRA's A·x)."""
        self.gpu.write_buffer(self.rows, 0, np.array([t, 0, 0, 0], np.uint32).tobytes())
        self.gpu.write_buffer(self.y, 0, np.full(t * self.n, np.nan, np.float32).tobytes())
        self.gpu.submit([*before, *mm.dispatches(t, lora=lora)])
        return np.frombuffer(self.gpu.read_buffer(self.y, 0, t * self.n * 4), np.float32).reshape(t, self.n)

    def check(self, mm: QuantMatmul, t: int, tol: float) -> None:
        got = self.run(mm, t)
        x = self.x[:t].astype(np.float64)
        scale = np.abs(x) @ np.abs(self.w).T
        if mm.chunked and t <= mm.tuning.matvec_max_t:
            x = int8_x(self.x[:t])
        err = np.abs(got - x @ self.w.T) / scale
        assert err.max() <= tol, f"T={t}: max relative error {err.max():.2e} > {tol:.0e}"


@pytest.mark.parametrize("name", TYPES)
def test_snippet_composes_with_every_skeleton(gpu, name):
    """Each GPU-readable type's snippet exists, declares the table's block geometry, and compiles
    and runs in the mat-vec, mat-mat and embedding kernels (one small step each, against numpy)."""
    case = Case(gpu, name, 8, K_FOR_BLOCK[QUANTS_BY_NAME[name].block_size], t_max=16, seed=6)
    mm = case.matmul(f16=False)
    for t in (1, mm.tuning.matvec_max_t + 1):  # the last mat-vec step size, the first mat-mat one
        case.check(mm, t, TOL[False])
    tokens = np.array([5, 0, 7], np.int32)
    tokens_buf = gpu.create_buffer(tokens.nbytes, STORAGE_RW)
    gpu.write_buffer(tokens_buf, 0, tokens.tobytes())
    y = gpu.create_buffer(len(tokens) * case.k * 4, STORAGE_RW)
    embed = ops.Embed(gpu, case.weight, (tokens_buf, 0, tokens.nbytes), (y, 0, y.size), scale=0.5)
    gpu.submit(embed.dispatches(len(tokens)))
    got = np.frombuffer(gpu.read_buffer(y, 0, y.size), np.float32).reshape(len(tokens), case.k)
    np.testing.assert_allclose(got, case.w[tokens] * 0.5, rtol=1e-6, atol=1e-30)


@pytest.mark.parametrize("f16", [False, True], ids=["f32", "f16"])
@pytest.mark.parametrize("name", TYPES)
def test_matvec_and_matmat(gpu, name, f16):
    if f16 and "shader-f16" not in gpu.features:
        pytest.skip("no shader-f16")
    case = Case(gpu, name, N, K_FOR_BLOCK[QUANTS_BY_NAME[name].block_size], t_max=130)
    mm = case.matmul(f16=f16)
    for t in (1, 5, 67, 130):  # mat-vec (one row, several), then mat-mat with partial and several token tiles
        case.check(mm, t, TOL[f16])


# Every tile the GPU table may pick, checked here on the CPU adapter too, and the other register
# tile shapes and slice depths.
GPU_TILES = (*(tile for tile, _ in TUNING[False].tiles), Tile(64, 64, 8, 8), Tile(32, 32, 4, 8, 16),
             Tile(16, 4, 4, 4, 8))


@pytest.mark.parametrize("tile", GPU_TILES, ids=str)
@pytest.mark.parametrize("name", ["Q4_K", "Q5_0", "F16"])  # 256- and 32-element blocks, 8-wide K slices
def test_matmat_tiles(gpu, name, tile):
    case = Case(gpu, name, N, K_FOR_BLOCK[QUANTS_BY_NAME[name].block_size], t_max=130, seed=3)
    tuning = dataclasses.replace(TUNING[False], tiles=((tile, 0),), matvec_max_t=0)
    for f16 in {False, "shader-f16" in gpu.features}:
        mm = case.matmul(f16=f16, tuning=tuning)
        for t in (2, 67, 130):
            case.check(mm, t, TOL[f16])


def test_tile_choice():
    """The first tile whose grid has the workgroups it needs, else the one with the most; slices as
    deep as K and the device's workgroup memory allow; tiles over its thread limit dropped."""
    big, mid, small = Tile(128, 64, 8, 8), Tile(64, 32, 4, 4, 128), Tile(16, 8, 4, 4)
    table = [(big, 128), (mid, 128), (small, 1000)]
    assert pick_tile(table, 2048, 512) == big  # 16 x 8 workgroups
    assert pick_tile(table, 2048, 256) == mid  # big: 16 x 4; mid: 32 x 8
    assert pick_tile(table, 2048, 4) == small  # none has enough: the most (128 x 1)
    limits = {"max_compute_workgroup_storage_size": 16384, "max_compute_invocations_per_workgroup": 256}
    shallower = dataclasses.replace
    # f16 mid, 128 deep, takes 26624 bytes; f32 tiles twice as many as f16 ones
    assert fit_tiles(table[:2], limits, True, 4096) == [(big, 128), (shallower(mid, bk=64), 128)]
    assert fit_tiles(table[1:2], limits, True, 96) == [(shallower(mid, bk=32), 128)]  # 96 = 3 x 32
    assert fit_tiles(table[:2], limits, False, 4096) == [(shallower(big, bk=16), 128), (shallower(mid, bk=32), 128)]
    limits["max_compute_invocations_per_workgroup"] = 64
    assert fit_tiles(table, limits, True, 4096) == [(small, 1000)]
    with pytest.raises(ValueError, match="no mat-mat tile"):
        fit_tiles(table[:2], limits, True, 4096)


@pytest.mark.parametrize("name", TYPES)
def test_matvec_tables_and_reductions(gpu, name):
    """Both tables' mat-vec shapes, with subgroup shuffles and with the workgroup-memory reduction
    (hosts without subgroups), T = 3 rows through mat-vec."""
    case = Case(gpu, name, N, K_FOR_BLOCK[QUANTS_BY_NAME[name].block_size], t_max=3, seed=1)
    for table in TUNING.values():
        tuning = dataclasses.replace(table, matvec_max_t=4)
        for subgroups in (False, True):
            case.check(case.matmul(f16=False, subgroups=subgroups, tuning=tuning), 3, TOL[False])


# (threads per workgroup, lanes per row, rows per team): one lane per row (no reduction), teams
# wider than lavapipe's 8-wide subgroups (shuffles, then workgroup memory), a team per workgroup,
# rows in one vec4 and in two. lane_pairs=0 keeps the lanes however short K is: with K=160 (20
# groups) most of 32 lanes get nothing; F32's 25 groups leave one lane a lone group.
SHAPES = ((64, 1, 4), (64, 4, 3), (128, 16, 2), (256, 32, 1), (32, 32, 8), (16, 8, 6), (64, 2, 5))


@pytest.mark.parametrize("subgroups", [False, True], ids=["shared", "subgroups"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "wg{}-lanes{}-r{}".format(*s))
@pytest.mark.parametrize("name", ["F32", "Q5_0", "Q4_K"])
def test_matvec_shapes(gpu, name, shape, subgroups):
    case = Case(gpu, name, N, K_FOR_BLOCK[QUANTS_BY_NAME[name].block_size], t_max=5, seed=4)
    wg, lanes, rows = shape
    tuning = dataclasses.replace(TUNING[False], matvec_wg=wg, matvec_lanes=lanes, matvec_lane_pairs=0,
                                 matvec_rows=rows, matvec_small=0)
    for f16 in {False, "shader-f16" in gpu.features}:
        mm = case.matmul(f16=f16, subgroups=subgroups, tuning=tuning)
        assert mm.matvec_shape == shape
        for t in (1, 5):
            case.check(mm, t, TOL[f16])


def test_matvec_shape_choice():
    """Small weights get one row per team of all the lanes; otherwise lanes halve until each gets
    `matvec_lane_pairs` pairs of groups; a GLU team splits its rows between gate and up; workgroups
    stay within the device's thread limit."""
    gpu_table = dataclasses.replace(TUNING[False], matvec_wg=256, matvec_lanes=32, matvec_lane_pairs=2, matvec_rows=4,
                                    matvec_small=1 << 22)
    assert matvec_shape(gpu_table, 4096, 4096, 1024) == (256, 32, 4)  # 256 pairs: 8 per lane
    assert matvec_shape(gpu_table, 262144, 640, 1024) == (256, 16, 4)  # 40 pairs: 2.5 per lane
    assert matvec_shape(gpu_table, 2048, 640, 1024) == (256, 32, 1)  # small: latency-bound
    assert matvec_shape(gpu_table, 1 << 16, 64, 1024, glu=True) == (256, 2, 2)
    assert matvec_shape(dataclasses.replace(gpu_table, matvec_rows=8), 4096, 4096, 1024, glu=True) == (256, 32, 4)
    assert matvec_shape(gpu_table, 4096, 4096, 128) == (128, 32, 4)
    # with LoRA side paths at least matvec_lora_rows, small weights too, halved for a GLU
    lora_table = dataclasses.replace(gpu_table, matvec_lora_rows=8)
    assert matvec_shape(lora_table, 2048, 640, 1024, lora=True) == (256, 32, 8)
    assert matvec_shape(lora_table, 2048, 640, 1024, glu=True, lora=True) == (256, 32, 4)
    assert matvec_shape(dataclasses.replace(gpu_table, matvec_lora_rows=2), 4096, 4096, 1024, lora=True) == (256, 32, 4)
    with pytest.raises(ValueError, match="powers of two"):
        dataclasses.replace(gpu_table, matvec_lanes=24)
    with pytest.raises(ValueError, match="rows 1 to 8"):
        dataclasses.replace(gpu_table, matvec_rows=9)
    with pytest.raises(ValueError, match="rows 1 to 8"):
        dataclasses.replace(gpu_table, matvec_lora_rows=0)


# (n, k, lanes, rows): row counts no workgroup's rows divide; K of 3 and 9 super-blocks (32 lanes
# take 4 a step: the last step partial), of 1 (a lane per chunk of one block) and 4; sums in hi (5 rows).
CHUNK_TABLE = dataclasses.replace(TUNING[False], matvec_chunks=frozenset({"Q4_K", "Q5_K", "Q6_K"}))
CHUNK_SHAPES = ((37, 768, 32, 2), (19, 2304, 32, 5), (37, 256, 8, 1), (45, 1024, 16, 3))


@pytest.mark.parametrize("name", sorted(CHUNK_SNIPPETS))
def test_chunk_walk_matches_int8_x(gpu, name):
    """The chunk walk (shaders/matvec_chunks.wgsl) of every type that has one computes W · int8_x(x)
    to f32 rounding, within x's rounding of W · x, for several shapes, with subgroups and without
    (32-element blocks also with K of 5 blocks)."""
    shapes = CHUNK_SHAPES + (((37, 160, 32, 2),) if QUANTS_BY_NAME[name].block_size == 32 else ())
    for i, (n, k, lanes, rows) in enumerate(shapes):
        case = Case(gpu, name, n, k, t_max=3, seed=i)
        tuning = dataclasses.replace(TUNING[False], matvec_lanes=lanes, matvec_lane_pairs=0, matvec_rows=rows,
                                     matvec_small=0, matvec_chunks=frozenset(CHUNK_SNIPPETS))
        mm = case.matmul(subgroups=bool(i % 2), tuning=tuning)
        assert mm.chunked and mm.matvec_shape == (256, lanes, rows)
        for t in (1, 3):
            case.check(mm, t, TOL[False])
        x = case.x[:3].astype(np.float64)
        err = np.abs(case.run(mm, 3) - x @ case.w.T) / (np.abs(x) @ np.abs(case.w).T)
        assert err.max() <= 1e-2, f"{n}x{k}: {err.max():.1e} from exact x"


def test_chunk_walk_choice(gpu):
    """A table that lists the K-quants walks them in chunks and nothing else (the GPU table lists
    Q8_0 and Q5_0 too, the CPU adapters' none); a team with fewer lanes than a block has chunks,
    or a device whose workgroup memory cannot hold x as int8, walks in groups."""
    k4, q8 = Case(gpu, "Q4_K", 8, 2048, t_max=1), Case(gpu, "Q8_0", 8, 2048, t_max=1)
    assert k4.matmul(tuning=CHUNK_TABLE).chunked and k4.matmul(tuning=TUNING[False]).chunked
    assert not k4.matmul(tuning=TUNING[True]).chunked and not q8.matmul(tuning=TUNING[True]).chunked
    assert not q8.matmul(tuning=CHUNK_TABLE).chunked and q8.matmul(tuning=TUNING[False]).chunked
    narrow = dataclasses.replace(CHUNK_TABLE, matvec_lanes=4, matvec_lane_pairs=0)
    assert not k4.matmul(tuning=narrow).chunked
    small = NarrowDevice(gpu, 65535, max_compute_workgroup_storage_size=chunk_walk_bytes(2048, 256) - 4)
    mm = k4.matmul(small, tuning=CHUNK_TABLE)
    assert not mm.chunked
    k4.check(mm, 1, TOL[mm.f16])


def test_chunk_walk_adds_lora_side_paths(gpu):
    """LoRA's side paths (from x unrounded) join the chunk walk's sums before they are reduced, at one
    token and at three."""
    from realm_wasm.gpu.lora import LoraGroup, LoraTokens
    from realm_wasm.lora import Adapter, LoraPair
    from realm_wasm.plan import Batch, lora_table

    n, k, t = 37, 512, 3
    case = Case(gpu, "Q5_K", n, k, t_max=t, seed=7)
    rng = np.random.default_rng(9)
    pair = LoraPair(rng.standard_normal((8, k)).astype(np.float32), rng.standard_normal((n, 8)).astype(np.float32))
    tokens = LoraTokens(gpu, t)
    group = LoraGroup(gpu, tokens, case.bindings[0], [("w", n)], k, slots=1, rank=8, workgroup=64,
                      subgroups=False, matvec_max_t=CHUNK_TABLE.matvec_max_t, label="w")
    group.write(0, Adapter("a", "test", 0.0, {"w": pair}))
    mm = case.matmul(tuning=CHUNK_TABLE, lora=group.pool(["w"]))
    assert mm.chunked
    per_token = [((0, 1.0),), (), ((0, -0.5),)]
    want = int8_x(case.x) @ case.w.T
    for i, adapters in enumerate(per_token):
        for _, scale in adapters:
            want[i] += scale * (pair.b.astype(np.float64) @ (pair.a @ case.x[i].astype(np.float64)))
    for steps in (1, t):
        zeros = np.zeros(steps, np.int32)
        tokens.write(Batch(zeros, zeros, zeros, np.zeros(1, np.int32), *lora_table(per_token[:steps])))
        got = case.run(mm, steps, lora=True, before=group.dispatches(steps, lora=True))
        np.testing.assert_allclose(got, want[:steps], rtol=0, atol=1e-4 * np.abs(want).max())


class NarrowDevice:
    """The test device, claiming a tiny per-dimension workgroup limit (forces grid folding), and
    any other `limits` given."""

    def __init__(self, gpu, max_dim: int, **limits: int) -> None:
        self._gpu = gpu
        self.limits = {**gpu.limits, "max_compute_workgroups_per_dimension": max_dim, **limits}

    def __getattr__(self, name):
        return getattr(self._gpu, name)


@pytest.mark.parametrize("f16", [False, True], ids=["f32", "f16"])
def test_weight_split_over_bindings_and_folded_grid(gpu, f16):
    """A weight over max_storage_buffer_binding_size (forced to 1000 bytes here) is uploaded as row
    ranges that each fit, streamed in 92-byte pieces that straddle them. 90-byte Q4_0 rows make
    chunks start on even rows (word-aligned) and the tensor's end be padded to a whole word."""
    case = Case(gpu, "Q4_0", N, 160, t_max=5, seed=2, piece=92, max_binding=1000)
    assert [c.rows for c in case.weight.chunks] == [10, 10, 10, 7]
    assert all(c.size <= 1000 for c in case.weight.chunks)
    mm = case.matmul(NarrowDevice(gpu, max_dim=2), f16=f16 and "shader-f16" in gpu.features)
    assert len(mm.dispatches(1)) == 4
    assert all(groups[0] <= 2 for _, _, groups in mm.dispatches(1))
    for t in (1, 5):
        case.check(mm, t, TOL[f16])


def test_codebook_weight_split_over_bindings(gpu):
    """A codebook type's lookup table ends every binding of its weight (the kernels read it from
    there); the binding limit counts it: 7 IQ3_S rows of 220 bytes fit beside its 2 KiB table (16
    would without it)."""
    tail = compose.table_tail("dequant_iq3_s.wgsl")
    assert len(tail) == 512 * 4
    case = Case(gpu, "IQ3_S", N, 512, t_max=12, seed=7, piece=440, max_binding=len(tail) + 7 * 220 + 3)
    assert [c.rows for c in case.weight.chunks] == [7] * 5 + [2]
    for c in case.weight.chunks:
        assert c.size == -(-c.rows * 220 // 4) * 4 + len(tail)
        assert gpu.read_buffer(c.buffer, c.size - len(tail), len(tail)) == tail
    mm = case.matmul(f16=False)
    for t in (1, 12):
        case.check(mm, t, TOL[False])


def test_bad_shapes_are_refused(gpu):
    qt = QUANTS_BY_NAME["Q4_K"]
    with pytest.raises(ValueError, match="multiple of 256"):
        upload_weight(gpu, qt, 4, 640, bytes(4 * 640 // 256 * 144))
    with pytest.raises(ValueError, match="bytes given"):
        upload_weight(gpu, qt, 4, 512, bytes(100))
    with pytest.raises(ValueError, match="not word-aligned"):
        write_weight(gpu, allocate_weight(gpu, qt, 4, 512), 2, bytes(8))
    case = Case(gpu, "Q8_0", 8, 64, t_max=2)
    with pytest.raises(ValueError, match="x binding"):
        case.matmul().dispatches(3)
    with pytest.raises(ValueError, match="no GPU kernel"):
        QuantMatmul(gpu, dataclasses.replace(case.weight, quant=QUANTS_BY_NAME["I32"]), *case.bindings)
    wrong = dataclasses.replace(QUANTS_BY_NAME["Q8_1"], type_size=40)  # gguf-py's stale Q8_1 size
    with pytest.raises(ValueError, match="dequant_q8_1.wgsl says 36"):
        QuantMatmul(gpu, dataclasses.replace(case.weight, quant=wrong), *case.bindings)


def test_device_loss_is_named(gpu):
    from realm_wasm.gpu.device import DeviceLost
    from realm_wasm.gpu.native import NativeDevice

    other = NativeDevice.create()  # not the shared fixture: this one is destroyed
    buf = other.create_buffer(16, STORAGE_RW)
    other.device.destroy()
    with pytest.raises(DeviceLost, match="was lost"):
        other.write_buffer(buf, 0, bytes(16))
    with pytest.raises(DeviceLost):
        other.read_buffer(buf, 0, 16)
    buf = gpu.create_buffer(16, STORAGE_RW)  # other devices carry on
    gpu.write_buffer(buf, 0, b"0123456789abcdef")
    assert asyncio.run(gpu.read_buffer_async(buf, 4, 8)) == b"456789ab"


def test_compose_directives_per_host():
    naga = compose.compose("naga", ["blocks.wgsl"], {"K": 64}, f16=True, subgroups=True)
    tint = compose.compose("tint", ["blocks.wgsl"], {"K": 64}, f16=True, subgroups=True)
    assert naga.splitlines()[:3] == ["enable f16;", "alias F = f16;", "const K: u32 = 64u;"]
    assert tint.splitlines()[:3] == ["enable f16;", "enable subgroups;", "alias F = f16;"]
    assert compose.compose("tint", ["blocks.wgsl"], {}).startswith("alias F = f32;")


def test_lookup_tables_are_the_numpy_grids():
    """The tables the codebook snippets read unpack to the grids realm_wasm.quants dequantizes with;
    a pipeline declares readers only for the tables its code (not its comments) names, each reading
    its words from the end of the weight binding in TABLES order."""
    for name, (bits, offset) in compose.TABLES.items():
        words = compose.table_words(name)
        fields = words[:, None] >> np.arange(0, 32, bits, dtype=np.uint32) & np.uint32((1 << bits) - 1)
        np.testing.assert_array_equal(fields.reshape(GRIDS[name].shape).astype(np.int64) - offset, GRIDS[name])
    source = "// iq2s_grid(0) is only mentioned here\nfn f(i: u32) -> u32 { return iq1s_grid(i) + iq3s_grid(i); }"
    assert compose.tables_used(source) == ["iq3s_grid", "iq1s_grid"]
    iq3s, iq1s = compose.table_readers(["iq3s_grid", "iq1s_grid"])[::-1]
    assert "arrayLength(&w) - 2048u + i" in iq1s and "arrayLength(&w) - 2560u + i" in iq3s
    assert compose.table_tail("dequant_iq1_m.wgsl") == compose.table_words("iq1s_grid").tobytes()
    assert compose.table_tail("dequant_q4_k.wgsl") == b""


def test_pipelines_are_cached_and_features_checked(gpu):
    parts = ("blocks.wgsl", "dequant_q8_0.wgsl", "reduce_lanes_shared.wgsl", "glu_act.wgsl", "rows_out.wgsl",
             "lora_off.wgsl", "matvec_groups.wgsl", "matvec.wgsl", "matvec_main.wgsl")
    consts = dict(K=64, N=8, R=1, LANES=4, WG=32, GLU=False, GELU=False, GRID_X=1, ROW0=0, Y_STRIDE=8, Y2_FROM=8,
                  Y2_AT=0, N_ALL=8)
    assert compose.pipeline(gpu, parts, consts) is compose.pipeline(gpu, parts, consts)

    class Bare(NarrowDevice):
        features = frozenset()

    with pytest.raises(ValueError, match="shader-f16"):
        compose.pipeline(Bare(gpu, 65535), parts, consts, f16=True)


def test_fold_grid():
    assert fold_grid(10, 65535) == (10, 1)
    assert fold_grid(131072, 65535) == (43691, 3)
    gx, gy = fold_grid(65536 * 5 + 3, 65535)
    assert gx <= 65535 and gx * gy >= 65536 * 5 + 3


def gelu(v: np.ndarray) -> np.ndarray:
    return 0.5 * v * (1 + np.tanh(np.sqrt(2 / np.pi) * (v + 0.044715 * v**3)))


def silu(v: np.ndarray) -> np.ndarray:
    return 0.5 * v * (1 + np.tanh(v / 2))  # v * sigmoid(v), without overflow


ACTS = {"gelu": gelu, "silu": silu}


class GluCase:
    """Gate and up weights of `half` rows each, joined on the device, y receiving [t_max, half]."""

    def __init__(self, gpu, name: str, half: int, k: int, t_max: int, seed: int = 5) -> None:
        self.gate, self.up = (Case(gpu, name, half, k, t_max, seed=seed + i) for i in range(2))
        self.gpu, self.half, self.x = gpu, half, self.gate.x  # both read the gate case's x buffer
        self.joined = concat_rows(gpu, self.gate.weight, self.up.weight, label="gate+up")
        assert self.joined is not None and self.joined.n == 2 * half
        self.y = gpu.create_buffer(t_max * half * 4, STORAGE_RW)
        xbuf, _, rows = self.gate.bindings
        self.bindings = (xbuf, (self.y, 0, t_max * half * 4), rows)

    def check(self, mm: QuantMatmul, act: str, t: int, tol: float) -> None:
        self.gpu.write_buffer(self.bindings[2][0], 0, np.array([t, 0, 0, 0], np.uint32).tobytes())
        self.gpu.write_buffer(self.y, 0, np.full(t * self.half, np.nan, np.float32).tobytes())
        self.gpu.submit(mm.dispatches(t))
        got = np.frombuffer(self.gpu.read_buffer(self.y, 0, t * self.half * 4), np.float32).reshape(t, self.half)
        x = int8_x(self.x[:t]) if mm.chunked and t <= mm.tuning.matvec_max_t else self.x[:t].astype(np.float64)
        g, u = x @ self.gate.w.T, x @ self.up.w.T
        # each dot product is within tol of its scale sum |w x|; act' is within [-0.13, 1.13]
        bound = tol * (1.13 * np.abs(x) @ np.abs(self.gate.w).T * np.abs(u)
                       + np.abs(ACTS[act](g)) * (np.abs(x) @ np.abs(self.up.w).T))
        err = np.abs(got - ACTS[act](g) * u)
        assert (err <= bound + 1e-30).all(), f"T={t}: worst error / bound {(err / bound).max():.2f}"


def glu_half(name: str, k: int) -> int:
    """37 gate rows (odd) where they end on a word boundary (concat_rows's rule), else 38."""
    qt = QUANTS_BY_NAME[name]
    return 37 if 37 * k // qt.block_size * qt.type_size % 4 == 0 else 38


@pytest.mark.parametrize("act", ["gelu", "silu"])
@pytest.mark.parametrize("name", ["F16", "Q4_0", "Q8_0", "Q4_K", "Q6_K", "IQ2_S"])  # IQ2_S: joined with its table
def test_glu_matvec_and_matmat(gpu, name, act):
    """act(W_gate x) * (W_up x) from one joined weight: mat-vec (one dispatch) with both tables and
    both reductions, then mat-mat into scratch + Glu."""
    k = K_FOR_BLOCK[QUANTS_BY_NAME[name].block_size]
    case = GluCase(gpu, name, glu_half(name, k), k, t_max=67)
    for table in TUNING.values():
        for subgroups in (False, True):
            tuning = dataclasses.replace(table, matvec_max_t=4)
            mm = QuantMatmul(gpu, case.joined, *case.bindings, f16=False, subgroups=subgroups, tuning=tuning, glu=act)
            assert len(mm.dispatches(1)) == 1
            for t in (1, 3):
                case.check(mm, act, t, TOL[False])
    f16 = "shader-f16" in gpu.features
    mm = QuantMatmul(gpu, case.joined, *case.bindings, f16=f16, glu=act)
    for t in (1, 67):
        case.check(mm, act, t, TOL[f16])


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "wg{}-lanes{}-r{}".format(*s))
def test_glu_matvec_shapes(gpu, shape):
    case = GluCase(gpu, "Q5_0", 38, 160, t_max=2, seed=7)
    wg, lanes, rows = shape
    tuning = dataclasses.replace(TUNING[False], matvec_wg=wg, matvec_lanes=lanes, matvec_lane_pairs=0,
                                 matvec_rows=rows, matvec_small=0)
    mm = QuantMatmul(gpu, case.joined, *case.bindings, f16=False, tuning=tuning, glu="gelu")
    assert mm.matvec_shape == (wg, lanes, max(1, min(4, rows // 2)))
    case.check(mm, "gelu", 2, TOL[False])


def test_concat_rows(gpu):
    """Rows of a then b, copied on the device from chunked weights; None where they cannot be joined."""
    a = Case(gpu, "Q4_0", 20, 160, t_max=1, seed=8, max_binding=1000)  # 90-byte rows, chunks of 10
    b = Case(gpu, "Q4_0", 7, 160, t_max=1, seed=9, max_binding=1000)  # ends mid-word: padded
    joined = concat_rows(gpu, a.weight, b.weight)
    assert (joined.n, len(joined.chunks)) == (27, 1)
    got = np.frombuffer(gpu.read_buffer(joined.chunks[0].buffer, 0, joined.chunks[0].size), np.uint8)
    dequant = oracle_dequant("Q4_0", got[: 27 * 90].reshape(-1, 18)).reshape(27, 160)
    np.testing.assert_array_equal(dequant, np.concatenate([a.w, b.w]))
    assert concat_rows(gpu, b.weight, a.weight) is None  # 7 x 90 bytes: b's end is not word-aligned
    assert concat_rows(gpu, a.weight, Case(gpu, "Q8_0", 4, 160, t_max=1).weight) is None
    assert concat_rows(gpu, a.weight, Case(gpu, "Q4_0", 4, 320, t_max=1).weight) is None
    small = NarrowDevice(gpu, 65535)
    small.limits["max_storage_buffer_binding_size"] = 26 * 90
    assert concat_rows(small, a.weight, b.weight) is None
    with pytest.raises(ValueError, match="one binding"):
        QuantMatmul(gpu, a.weight, *a.bindings, glu="gelu")


def rms_normed(v: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return v / np.sqrt(np.mean(v * v, axis=-1, keepdims=True) + eps) * w


@pytest.mark.parametrize("then", [True, False], ids=["then-next-norm", "residual-only"])
@pytest.mark.parametrize("table", [False, True], ids=["gpu-table", "cpu-table"])
@pytest.mark.parametrize("name", ["Q8_0", "Q6_K"])  # Q6_K: the chunk walk on the GPU table
def test_matvec_then_residual_norm(gpu, then, table, name):
    """The mat-vec's last workgroup runs the residual RMSNorm of its output (and the next pre-norm);
    bigger steps run the mat-mat kernel, then ops.RmsNorm. Repeated steps check the arrival
    counters are left at zero."""
    n, k, eps = 300, 256, 1e-6
    case = Case(gpu, name, n, k, t_max=40, seed=5)
    rng = np.random.default_rng(6)
    w, w2 = (rng.standard_normal(n, dtype=np.float32) for _ in range(2))
    resid0 = rng.standard_normal((40, n), dtype=np.float32)
    buf = {name: gpu.create_buffer(a.nbytes, STORAGE_RW) for name, a in (("w", w), ("w2", w2), ("resid", resid0))}
    h = gpu.create_buffer(resid0.nbytes, STORAGE_RW)
    for name, a in (("w", w), ("w2", w2)):
        gpu.write_buffer(buf[name], 0, a.tobytes())
    binding = {name: (b, 0, b.size) for name, b in buf.items()}
    after = (binding["w2"], (h, 0, h.size)) if then else None
    norm = ResidualNorm(binding["w"], binding["resid"], eps, after)
    mm = case.matmul(f16=False, tuning=TUNING[table], norm=norm)
    for t in (1, 3, 1, 37):  # mat-vec steps (twice one token: counters reset), then mat-mat + RmsNorm
        gpu.write_buffer(buf["resid"], 0, resid0.tobytes())
        gpu.write_buffer(case.rows, 0, np.array([t, 0, 0, 0], np.uint32).tobytes())
        assert len(mm.dispatches(t)) == (1 if t <= TUNING[table].matvec_max_t else 2)
        gpu.submit(mm.dispatches(t))
        x = int8_x(case.x[:t]) if mm.chunked and t <= mm.tuning.matvec_max_t else case.x[:t].astype(np.float64)
        y = x @ case.w.T
        want_resid = resid0[:t] + rms_normed(y, w, eps)
        got_resid = np.frombuffer(gpu.read_buffer(buf["resid"], 0, t * n * 4), np.float32).reshape(t, n)
        np.testing.assert_allclose(got_resid, want_resid, rtol=1e-4, atol=1e-4)
        if then:
            got_h = np.frombuffer(gpu.read_buffer(h, 0, t * n * 4), np.float32).reshape(t, n)
            np.testing.assert_allclose(got_h, rms_normed(want_resid, w2, eps), rtol=1e-4, atol=1e-4)


def test_residual_norm_needs_one_plain_binding(gpu):
    case = Case(gpu, "Q8_0", 64, 256, t_max=2, max_binding=32 * 272)
    vec = gpu.create_buffer(64 * 4 * 2, STORAGE_RW)
    with pytest.raises(ValueError, match="plain weight in one binding"):
        case.matmul(norm=ResidualNorm((vec, 0, 256), (vec, 0, 512), 1e-6))


@pytest.mark.parametrize("table", [False, True], ids=["gpu-table", "cpu-table"])
def test_joined_projections_write_two_regions(gpu, table):
    """q and k joined (`concat_rows`) in one kernel: rows below n0 land in y, the rest in a region
    after it in the same buffer, for mat-vec and mat-mat steps; nothing else is written."""
    n_q, n_k, k = 96, 40, 256
    q, kk = (Case(gpu, "Q5_0", n, k, t_max=40, seed=s) for n, s in ((n_q, 8), (n_k, 9)))
    joined = concat_rows(gpu, q.weight, kk.weight)
    at = 40 * n_q * 4 + 64  # an aligned gap the kernel must leave alone
    out = gpu.create_buffer(at + 40 * n_k * 4, STORAGE_RW)
    y, y2 = (out, 0, 40 * n_q * 4), (out, at, 40 * n_k * 4)
    mm = QuantMatmul(gpu, joined, q.bindings[0], y, q.bindings[2], second=(n_q, y2), f16=False, tuning=TUNING[table])
    for t in (1, 3, 37):
        gpu.write_buffer(out, 0, np.full(out.size // 4, np.nan, np.float32).tobytes())
        gpu.write_buffer(q.rows, 0, np.array([t, 0, 0, 0], np.uint32).tobytes())
        gpu.submit(mm.dispatches(t))
        got = np.frombuffer(gpu.read_buffer(out, 0, out.size), np.float32)
        x = int8_x(q.x[:t]) if mm.chunked and t <= mm.tuning.matvec_max_t else q.x[:t].astype(np.float64)
        np.testing.assert_allclose(got[: t * n_q].reshape(t, n_q), x @ q.w.T, rtol=2e-3, atol=2e-3)
        np.testing.assert_allclose(got[at // 4 : at // 4 + t * n_k].reshape(t, n_k), x @ kk.w.T, rtol=2e-3,
                                   atol=2e-3)
        assert np.isnan(got[t * n_q : at // 4]).all() and np.isnan(got[at // 4 + t * n_k :]).all()
    with pytest.raises(ValueError, match="second output must follow y"):
        QuantMatmul(gpu, joined, q.bindings[0], y2, q.bindings[2], second=(n_q, y))
