"""Realm against llama.cpp on the same GGUF, same machine, same run: prefill, decode, batched decode.

    python bench/bench_vs_llama_cpp.py --model FILE --llama-bin /tmp/llama.cpp/build/bin [--backend webgpu]

llama.cpp: `llama-bench -p 512 -n 128 -ngl 99` (pp512 and tg128, flash attention off and on, the
better of the two) and `llama-batched-bench -npp 16 -ntg 64 -npl 1,8,32 -ngl 99` (aggregate
generation tokens/s at each number of parallel sequences). Realm: a 512-token prefill
(`Engine.prefill`), 128 decoded tokens (`Engine.generate`, first token to last), and the
scheduler decoding 1, 8 and 32 sequences of 16 prompt + 64 generated tokens at once (aggregate
tokens/s of the steps after every prompt is in). Prints one table with the ratios.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from pathlib import Path

import numpy as np

from realm_wasm.engine import Engine
from realm_wasm.scheduler import Request, Scheduler

PARALLEL = (1, 8, 32)


def run(command: list[str]) -> str:
    out = subprocess.run(command, capture_output=True, text=True, timeout=900)
    if out.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{out.stderr[-2000:]}")
    return out.stdout


def llama_cpp(bin_dir: Path, model: Path) -> dict[str, float]:
    best: dict[str, float] = {}
    for fa in ("0", "1"):
        rows = json.loads(run([str(bin_dir / "llama-bench"), "-m", str(model), "-p", "512", "-n", "128", "-ngl", "99",
                               "-fa", fa, "-o", "json"]))
        for r in rows:
            key = "prefill" if r["n_prompt"] else "decode"
            best[key] = max(best.get(key, 0.0), r["avg_ts"])
    text = run([str(bin_dir / "llama-batched-bench"), "-m", str(model), "-c", "8192", "-b", "2048", "-ub", "512",
                "-npp", "16", "-ntg", "64", "-npl", ",".join(map(str, PARALLEL)), "-ngl", "99"])
    header = None
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if "S_TG t/s" in cells:
            header = cells
        elif header and len(cells) == len(header) and cells[0].isdigit():
            best[f"batched {cells[header.index('B')]}"] = float(cells[header.index("S_TG t/s")])
    return best


def realm(model: Path, backend: str) -> tuple[dict[str, float], str]:
    rng = np.random.default_rng(0)
    engine = Engine.load(model, backend=backend, n_ctx=1024, n_slots=max(PARALLEL))
    vocab = engine.tokenizer.vocab_size
    prompt = [engine.tokenizer.bos_id or 1] + rng.integers(300, vocab - 1, 511).tolist()
    out = {}
    for _ in range(2):  # the first run warms up
        t0 = time.perf_counter()
        for _ in engine.prefill(prompt):
            pass
        out["prefill"] = max(out.get("prefill", 0.0), 512 / (time.perf_counter() - t0))
        times = [e.elapsed_s for e in engine.generate(prompt[:16], 129, stop_at_eos=False) if e.token_id is not None]
        out["decode"] = max(out.get("decode", 0.0), 128 / (times[-1] - times[0]))
    for n in PARALLEL:
        scheduler = Scheduler(engine, n_slots=n, max_step_tokens=max(256, n + 1))
        done: list = []
        for _ in range(n):
            ids = [engine.tokenizer.bos_id or 1] + rng.integers(300, vocab - 1, 15).tolist()
            scheduler.submit(Request(ids, 64, stop_at_eos=False), done.append)
        while scheduler.stats().tokens_generated < n:  # every prompt in, its first token out
            scheduler.step()
        t0, before = time.perf_counter(), scheduler.stats().tokens_generated
        while scheduler.busy:
            scheduler.step()
        out[f"batched {n}"] = (scheduler.stats().tokens_generated - before) / (time.perf_counter() - t0)
    return out, engine.executor.name


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--llama-bin", type=Path, required=True, help="folder with llama-bench and llama-batched-bench")
    ap.add_argument("--backend", default="webgpu")
    args = ap.parse_args()
    ours, executor = realm(args.model, args.backend)
    ref = llama_cpp(args.llama_bin, args.model)
    print(f"{args.model.name} ({args.model.stat().st_size / 1e9:.2f} GB), Realm on {executor}, llama.cpp CUDA\n")
    print("| measure | llama.cpp tok/s | Realm tok/s | Realm / llama.cpp |")
    print("| --- | ---: | ---: | ---: |")
    names = {"prefill": "prefill 512 (pp512)", "decode": "decode (tg128)",
             **{f"batched {n}": f"aggregate decode, {n} sequences (pp16 tg64)" for n in PARALLEL}}
    for key, name in names.items():
        theirs, mine = ref.get(key), ours[key]
        ratio = f"{mine / theirs:.2f}x" if theirs else "n/a"
        print(f"| {name} | {theirs or float('nan'):.0f} | {mine:.0f} | {ratio} |")


if __name__ == "__main__":
    main()
