"""End-to-end prefill and decode speed of Realm's executors, with llama.cpp as the reference in the same run.

    python bench/bench_generate.py --backends numpy webgpu --prefill 512 --decode 64

Prints a table: tokens/s for prefill and decode and the effective bandwidth of decode (the GGUF's
tensor bytes read once per token). llama.cpp (llama-cpp-python) is measured when it is installed.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import numpy as np

from realm_wasm.engine import Engine
from realm_wasm.gguf import read_gguf
from realm_wasm.model_files import default_model_path


def bench_realm(path, backend: str, n_prefill: int, n_decode: int, repeats: int) -> dict:
    t0 = time.perf_counter()
    engine = Engine.load(path, backend=backend, n_ctx=n_prefill + n_decode + 8)
    load_s = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    prompt = [2] + [int(t) for t in rng.integers(1000, 20000, n_prefill - 1)]
    best_prefill = best_decode = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in engine.prefill(prompt):
            pass
        best_prefill = min(best_prefill, time.perf_counter() - t0)
        # decode as a user gets it: Engine.generate (sampling on the executor; on a GPU one step
        # queued ahead), timed from the first token to the last
        times = [ev.elapsed_s for ev in engine.generate(prompt, max_tokens=n_decode + 1, stop_at_eos=False)
                 if ev.token_id is not None]
        best_decode = min(best_decode, times[-1] - times[0])
    return dict(engine=f"realm {backend}", load_s=load_s, prefill=n_prefill / best_prefill,
                decode=n_decode / best_decode)


def bench_llama_cpp(path, n_prefill: int, n_decode: int, repeats: int, threads: int, gpu_layers: int) -> dict | None:
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    t0 = time.perf_counter()
    llm = Llama(str(path), n_ctx=n_prefill + n_decode + 8, n_threads=threads, n_batch=512,
                n_gpu_layers=gpu_layers, verbose=False)
    load_s = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    prompt = [2] + [int(t) for t in rng.integers(1000, 20000, n_prefill - 1)]
    best_prefill = best_decode = float("inf")
    for _ in range(repeats):
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt)
        best_prefill = min(best_prefill, time.perf_counter() - t0)
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        t0 = time.perf_counter()
        for _ in range(n_decode):
            llm.eval([token])
            token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        best_decode = min(best_decode, time.perf_counter() - t0)
    return dict(engine=f"llama.cpp ({threads} threads, {gpu_layers} GPU layers)", load_s=load_s,
                prefill=n_prefill / best_prefill, decode=n_decode / best_decode)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model")
    ap.add_argument("--backends", nargs="+", default=["numpy"])
    ap.add_argument("--prefill", type=int, default=128)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2, help="llama.cpp threads")
    ap.add_argument("--gpu-layers", type=int, default=0, help="llama.cpp layers on the GPU")
    args = ap.parse_args()
    path = Path(args.model) if args.model else default_model_path()
    weight_bytes = sum(t.nbytes for t in read_gguf(path).tensors.values())

    rows = [bench_realm(path, b, args.prefill, args.decode, args.repeats) for b in args.backends]
    ref = bench_llama_cpp(path, args.prefill, args.decode, args.repeats, args.threads, args.gpu_layers)
    rows += [ref] if ref else []
    print(f"model {path.name} ({weight_bytes / 1e6:.0f} MB of tensors), {platform.machine()}, "
          f"prefill {args.prefill} tokens, decode {args.decode} tokens, best of {args.repeats}")
    print("| engine | load s | prefill tok/s | decode tok/s | decode GB/s | decode vs llama.cpp |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        ratio = f"{r['decode'] / ref['decode']:.2f}x" if ref else "n/a"
        print(f"| {r['engine']} | {r['load_s']:.2f} | {r['prefill']:.1f} | {r['decode']:.1f} | "
              f"{r['decode'] * weight_bytes / 1e9:.2f} | {ratio} |")
    if ref is None:
        print("(llama-cpp-python not installed: no reference row)")


if __name__ == "__main__":
    main()
