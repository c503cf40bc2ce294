"""Where a GPU step's time goes: GPU time per op kind for one decode step and one prefill step.

    python bench/profile_step.py [--model PATH] [--prefill 256] [--lora-rank 16]

Each op's dispatches are timed alone (timestamp queries around their own pass), so the sum is
a little above the whole step's time (`whole step` row), which is what one submit costs. `host`
is the CPU time to record and submit the step's command buffer (wall time of `submit`, which
returns without waiting): decode runs one step ahead, so a step takes the larger of the two.
With --lora-rank, both steps apply a random adapter of that rank on every projection (bench_lora's).
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from realm_wasm.engine import Engine
from realm_wasm.gpu.fuse import label
from realm_wasm.model_files import default_model_path
from realm_wasm.plan import Batch


def profile(engine: Engine, batch: Batch, repeats: int = 5) -> None:
    ex = engine.executor
    counts = ex._write_step(batch)
    per_kind: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for kernel, launch in zip(ex.program, ex.launches, strict=True):  # the fused program's kernels
        dispatches = launch.dispatches(counts)
        t = float(np.median([ex.device.time_submit(dispatches) for _ in range(repeats)]))
        kind = label(ex.plan, kernel)
        per_kind[kind][0] += len(dispatches)
        per_kind[kind][1] += t
    whole = float(np.median([ex.device.time_submit(ex._dispatches(counts)) for _ in range(repeats)]))
    host = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        ex.device.submit(ex._dispatches(counts))
        host.append(time.perf_counter() - t0)
        tokens = ex.inputs["tokens"]
        ex.device.read_buffer(tokens[0], tokens[1], 4)  # wait: time each submit with an idle queue
    total = sum(t for _, t in per_kind.values())
    print(f"\n{len(batch)} tokens, {len(ex._dispatches(counts))} dispatches: whole step {whole * 1e3:.3f} ms GPU "
          f"({len(batch) / whole:.0f} tok/s), host {np.median(host) * 1e3:.3f} ms to record and submit")
    print("| kernel | dispatches | µs | share |")
    print("| --- | ---: | ---: | ---: |")
    for kind, (n, t) in sorted(per_kind.items(), key=lambda kv: -kv[1][1]):
        print(f"| {kind} | {n} | {t * 1e6:.0f} | {t / total:.0%} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model")
    ap.add_argument("--prefill", type=int, default=256)
    ap.add_argument("--lora-rank", type=int, default=0, help="apply a random LoRA adapter of this rank (0: none)")
    args = ap.parse_args()
    path = Path(args.model) if args.model else default_model_path()
    lora = {"max_adapters": 1, "max_lora_rank": args.lora_rank} if args.lora_rank else {}
    engine = Engine.load(path, backend="webgpu", n_ctx=1024, **lora)
    adapters = []
    if args.lora_rank:
        from bench_lora import random_adapter  # bench/ is the script's folder

        engine.load_adapter("random", random_adapter(engine, args.lora_rank, seed=0))
        adapters = [(engine.adapters.slot("random"), 1.0)]
    rng = np.random.default_rng(0)
    prompt = [2] + [int(t) for t in rng.integers(1000, 20000, args.prefill - 1)]
    engine.executor.forward(Batch.for_sequence(prompt, 0, adapters=adapters))
    profile(engine, Batch.for_sequence(prompt, 0, adapters=adapters))
    profile(engine, Batch.for_sequence([prompt[-1]], args.prefill, adapters=adapters))


if __name__ == "__main__":
    main()
