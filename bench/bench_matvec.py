"""Fused dequant + mat-vec (and mat-mat) throughput per quant type on the native device (wgpu-py).

    python bench/bench_matvec.py --peak 4800     # decode mat-vec, full shapes, % of an H200's 4.8 TB/s
    python bench/bench_matvec.py --types Q4_K,Q5_K,Q6_K --walk groups,chunks   # the K-quants' two mat-vec walks
    python bench/bench_matvec.py --quick         # small shapes for lavapipe / CPU adapters
    python bench/bench_matvec.py --types Q4_K,Q8_0 --wg 128,256 --lanes 8,16,32 --rows 1,2,4   # sweep mat-vec shapes
    python bench/bench_matvec.py --glu gelu --shapes 4096x640,28672x4096   # gate+up rows in one GLU dispatch
    python bench/bench_matvec.py --weights-mib 256   # cycle through weight copies: DRAM, not L2
    python bench/bench_matvec.py --t 256,512 --tile 64x32x4x4,128x64x8x8x16        # prefill tiles (TNxTTxRNxRT[xBK])
    python bench/bench_matvec.py --t 2,4,8,16 --tile matvec,auto        # batches: mat-vec per token vs mat-mat

Mat-vec configs read "wg W lanes L rows R": W threads per workgroup, L lanes sharing each weight row,
R output rows per team of L lanes, then the walk along K: "groups" (8 elements at a time through the
type's dequant snippet) or "chunks" (16-byte chunks of each block against x rounded to int8: the
K-quants on GPUs; Q8_0 and Q5_0 have one too). `--walk` runs the table's choice (default) or each
walk named. Without --lanes, lanes come from the table and shrink for short rows (as QuantMatmul
runs them); --lanes values are used as given. The K-quants' chunk walk needs 8 lanes or more (a
lane per chunk of a block): with fewer, or for a type without a chunk snippet, it runs the group
walk, which is then timed once.
GB/s counts the bytes the step must move at least once: the GGML weight bytes plus x and y.
Time is GPU time from timestamp queries around a pass of `--iters` back-to-back dispatches when
the adapter has them, else the wall clock of that submit (plus one read-back): the median of 5
passes after a warm-up. Back-to-back dispatches of one weight find it in the GPU's L2 cache when it
fits (50 MB on an H100 or H200); with --weights-mib they cycle through enough copies to exceed it.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import time

import numpy as np

from realm_wasm.gpu.device import STORAGE_RW, UNIFORM_RW
from realm_wasm.gpu.matmul import CHUNK_SNIPPETS, QuantMatmul, upload_weight
from realm_wasm.gpu.native import NativeDevice
from realm_wasm.gpu.tuning import TUNING, Tile, Tuning
from realm_wasm.quants import QUANTS_BY_NAME

TYPES = "F32,F16,BF16,Q4_0,Q4_1,Q5_0,Q5_1,Q8_0,Q8_1,Q2_K,Q3_K,Q4_K,Q5_K,Q6_K,Q8_K,IQ4_NL,IQ4_XS,TQ1_0,TQ2_0,MXFP4"
SHAPES = {False: "4096x4096,14336x4096,262144x640", True: "1024x1024,4096x512"}
FLOATS = {"F32": np.float32, "F16": np.float16}


def ints(text: str, sep: str = ",") -> list[int]:
    return [int(v) for v in text.split(sep)]


def weight_bytes(name: str, n: int, k: int, rng: np.random.Generator) -> bytes:
    """Random weights: real floats for plain types, random blocks for quantized ones (timing only)."""
    if name in FLOATS:
        return rng.standard_normal((n, k), dtype=np.float32).astype(FLOATS[name]).tobytes()
    qt = QUANTS_BY_NAME[name]
    return rng.integers(0, 256, n * k // qt.block_size * qt.type_size, dtype=np.uint8).tobytes()


def seconds(device: NativeDevice, dispatches: list, iters: int, y, warm: float = 0.03, passes: int = 5) -> float:
    """Median time of one dispatch of `dispatches` (a cycle of equal ones) over `passes` passes of
    `iters` back-to-back dispatches, after `warm` seconds of the same work: the first use compiles
    and pages in, and a GPU that idled while the host built pipelines needs some load before it
    reaches its full clock."""
    work = list(itertools.islice(itertools.cycle(dispatches), iters))

    def one_pass() -> float:
        if "timestamp-query" in device.features:
            return device.time_submit(work)
        start = time.perf_counter()
        device.submit(work)
        device.read_buffer(y, 0, 4)
        return time.perf_counter() - start

    spent = one_pass()
    while spent < warm:
        spent += one_pass()
    return float(np.median([one_pass() for _ in range(passes)])) / iters


# --walk names -> the types Tuning.matvec_chunks holds
WALKS = {"groups": frozenset(), "chunks": frozenset(CHUNK_SNIPPETS)}


def variants(args: argparse.Namespace, t: int, default: Tuning) -> list[tuple[str, Tuning]]:
    """(label, tuning) for every kernel shape asked for: mat-vec wg x lanes x rows x walk, or for
    T > 1 "table" (what QuantMatmul runs), "auto" (the table's mat-mat tile, also where it would run
    the mat-vec kernel), "matvec" (the mat-vec kernel once per token) or a mat-mat tile."""
    if t == 1:
        walks = [WALKS[w] for w in args.walk.split(",")] if args.walk else [default.matvec_chunks]
        wgs = ints(args.wg) if args.wg else [default.matvec_wg]
        lanes = ints(args.lanes) if args.lanes else [default.matvec_lanes]
        rows = ints(args.rows) if args.rows else [default.matvec_rows]
        pairs = 0 if args.lanes else default.matvec_lane_pairs  # 0: lanes as given, however short K is
        small = 0 if args.lanes or args.rows else default.matvec_small  # 0: rows as given, however small
        return [("matvec", dataclasses.replace(default, matvec_wg=wg, matvec_lanes=ln, matvec_lane_pairs=pairs,
                                               matvec_small=small, matvec_rows=r, matvec_chunks=walk))
                for wg, ln, r, walk in itertools.product(wgs, lanes, rows, walks) if ln <= wg]
    out = []
    for spec in (args.tile or "table").split(","):
        if spec == "table":
            out.append(("table", default))
        elif spec == "auto":
            out.append(("auto", dataclasses.replace(default, matvec_max_t=0)))
        elif spec == "matvec":
            out.append(("matvec", dataclasses.replace(default, matvec_max_t=t)))
        else:
            tile = Tile(*ints(spec, "x"))
            out.append((spec, dataclasses.replace(default, matvec_max_t=0, tiles=((tile, 0),))))
    return out


def config_label(label: str, mm: QuantMatmul, t: int) -> str:
    """What ran: the mat-vec shape, or the mat-mat tile (+ the GLU activation)."""
    glu = f" {mm.glu}" if mm.glu else ""
    if label in ("matvec", "table", "auto") and t <= mm.tuning.matvec_max_t:
        return "wg{} lanes{} rows{} {}".format(*mm.matvec_shape, "chunks" if mm.chunked else "groups") + glu
    if label in ("table", "auto"):
        return f"{label} {'x'.join(map(str, dataclasses.astuple(mm.tile(t))))}{glu}"
    return label + glu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small shapes (CPU adapters)")
    ap.add_argument("--peak", "--peak-gbps", dest="peak", type=float, default=4800.0,
                    help="device memory bandwidth in GB/s for the %% column (H200: 4800, H100: 3350)")
    ap.add_argument("--types", default=TYPES)
    ap.add_argument("--shapes", help="N x K list, e.g. 4096x4096,262144x640 (with --glu, N counts gate and up rows)")
    ap.add_argument("--t", default="1", help="rows per step, comma-separated (1: mat-vec; more: mat-mat)")
    ap.add_argument("--iters", type=int, help="dispatches per timed pass (default 100, --quick 5)")
    ap.add_argument("--f16", choices=("auto", "on", "off"), default="auto", help="f16 arithmetic (auto: table)")
    ap.add_argument("--no-subgroups", action="store_true", help="workgroup-memory reduction only")
    ap.add_argument("--wg", help="mat-vec threads per workgroup (powers of two), comma-separated to sweep")
    ap.add_argument("--lanes", help="mat-vec lanes per weight row (powers of two <= wg), comma-separated to sweep")
    ap.add_argument("--rows", help="mat-vec output rows per lane team (1-8), comma-separated to sweep")
    ap.add_argument("--walk", help="mat-vec walks along K: groups, chunks, comma-separated (default: the table's)")
    ap.add_argument("--glu", choices=("gelu", "silu"), help="time the GLU mode: N/2 gate rows, then N/2 up rows")
    ap.add_argument("--weights-mib", type=float, default=0, help="cycle through weight copies of this many MiB")
    ap.add_argument("--tile", help="TNxTTxRNxRT[xBK] list, or table / auto / matvec (default: table)")
    args = ap.parse_args()

    device = NativeDevice.create()
    default = TUNING[device.is_fallback_adapter]
    iters = args.iters or (5 if args.quick else 100)
    f16 = {"auto": default.f16, "on": True, "off": False}[args.f16] and "shader-f16" in device.features
    subgroups = "subgroups" in device.features and not args.no_subgroups
    rng = np.random.default_rng(0)
    print(f"# {device.name}: f16={f16} subgroups={subgroups} "
          f"timer={'timestamps' if 'timestamp-query' in device.features else 'wall clock'}")
    print(f"{'type':7} {'N x K':>14} {'T':>4} {'config':>35} {'us':>10} {'GB/s':>8} {'% peak':>7} {'GFLOP/s':>9}")
    steps = ints(args.t)
    for name in args.types.split(","):
        qt = QUANTS_BY_NAME[name]
        for n, k in (ints(s, "x") for s in (args.shapes or SHAPES[args.quick]).split(",")):
            if k % qt.block_size:
                print(f"{name:7} {f'{n} x {k}':>14}  (K is not a multiple of the {qt.block_size}-element block)")
                continue
            data = weight_bytes(name, n, k, rng)
            copies = max(1, -(-int(args.weights_mib * 2**20) // len(data)))
            weights = [upload_weight(device, qt, n, k, data, label=name) for _ in range(copies)]
            width = n // 2 if args.glu else n
            t_max = max(steps)
            x = device.create_buffer(t_max * k * 4, STORAGE_RW)
            device.write_buffer(x, 0, rng.standard_normal(t_max * k, dtype=np.float32).tobytes())
            y = device.create_buffer(t_max * width * 4, STORAGE_RW)
            rows = device.create_buffer(16, UNIFORM_RW)
            for t in steps:
                device.write_buffer(rows, 0, np.array([t, 0, 0, 0], np.uint32).tobytes())
                timed = set()  # configs run: a walk the type has not (chunks for Q8_0) runs the other
                for label, tuning in variants(args, t, default):
                    mms = [QuantMatmul(device, w, (x, 0, t * k * 4), (y, 0, t * width * 4), (rows, 0, 16),
                                       f16=f16, subgroups=subgroups, tuning=tuning, glu=args.glu) for w in weights]
                    if config_label(label, mms[0], t) in timed:
                        continue
                    timed.add(config_label(label, mms[0], t))
                    per_weight = [mm.dispatches(t) for mm in mms]
                    s = seconds(device, [d for ds in per_weight for d in ds], iters * len(per_weight[0]), y,
                                passes=1 if args.quick else 5) * len(per_weight[0])
                    gbps = (len(data) + 4 * t * (width + k)) / s / 1e9
                    print(f"{name:7} {f'{n} x {k}':>14} {t:4} {config_label(label, mms[0], t):>35} {s * 1e6:10.1f} "
                          f"{gbps:8.1f} {100 * gbps / args.peak:6.1f}% {2 * t * n * k / s / 1e9:9.1f}", flush=True)
            for w in weights:
                for chunk in w.chunks:
                    chunk.buffer.destroy()


if __name__ == "__main__":
    main()
