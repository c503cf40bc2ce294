"""A decode step's own cost on the GPU side, natively and in the page, without the scheduler: the
step's dispatches submitted N times, either back to back with one read-back at the end, or each
with its read-back (a few bytes, as a sampled step has) and Q steps queued ahead of the one read.

    python bench/bench_step_gpu.py [--steps 300] [--tokens 1 8] [--queued 0 3 8] [--model F]

Decode in the page runs at a fraction of native speed while its worker waits for read-backs most
of each step (bench/profile_page.py). This takes the host's Python out: the same step (T tokens,
the model's real kernels through the executor's own dispatch list) over and over, so what a step
costs here is what the GPU, the read-back and, in Chromium, the GPU process take. What decode
costs beyond it (bench_browser.py) is the scheduler's and the page's own work per step.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from profile_page import in_page_worker

from realm_wasm.model_files import default_model_path

# Runs on either side with `executor` bound: {T: {"dispatches": n, "back to back": ms, Q: ms}}.
STEPS = '''
import time
from collections import deque
from realm_wasm.plan import Batch

async def wait(read_back):
    return await read_back.result_async() if hasattr(read_back, "result_async") else read_back.result()

async def step_ms(executor, steps, sizes, depths):
    out = {}
    for t in sizes:
        counts = executor._write_step(Batch.for_sequence([2] * t, 16))
        dispatches = executor._dispatches(counts)
        read = (executor.acts["logits"][0], 0, 16)
        await wait(executor.device.submit(dispatches, read=read))  # pipelines warm, queue empty
        row = {"dispatches": len(dispatches)}
        t0 = time.perf_counter()
        for _ in range(steps - 1):
            executor.device.submit(dispatches)
        await wait(executor.device.submit(dispatches, read=read))
        row["back to back"] = (time.perf_counter() - t0) / steps * 1e3
        for depth in depths:
            pending = deque()
            t0 = time.perf_counter()
            for _ in range(steps):
                pending.append(executor.device.submit(dispatches, read=read))
                if len(pending) > depth:
                    await wait(pending.popleft())
            while pending:
                await wait(pending.popleft())
            row[str(depth)] = (time.perf_counter() - t0) / steps * 1e3
        out[str(t)] = row
    return out
'''


def native(model: Path, steps: int, sizes: list[int], depths: list[int]) -> dict:
    import asyncio

    from realm_wasm.engine import Engine

    space: dict = {}
    exec(STEPS, space)
    return asyncio.run(space["step_ms"](Engine.load(model, backend="webgpu").executor, steps, sizes, depths))


def page(model: Path, steps: int, sizes: list[int], depths: list[int]) -> dict:
    code = STEPS + f'''
import json
from realm_web_host import HOST
json.dumps(await step_ms(HOST.loaded.engine.executor, {steps}, {sizes!r}, {depths!r}))
'''
    return json.loads(in_page_worker(model, "webgpu", code))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 8], help="tokens per step")
    parser.add_argument("--queued", type=int, nargs="+", default=[0, 3, 8], help="steps queued ahead of the one read")
    parser.add_argument("--model", type=Path, default=None, help="GGUF file (default: the bundled gemma-3-270m)")
    args = parser.parse_args()
    model = args.model or default_model_path()
    rows = {where: run(model, args.steps, args.tokens, args.queued) for where, run in (("native", native),
                                                                                     ("page", page))}
    print(f"{model.name}, {args.steps} steps of each kind, ms per step native / page (page / native)\n")
    kinds = ["back to back", *map(str, args.queued)]
    names = ["back to back, one read"] + [f"read each, {q} queued" for q in args.queued]
    print("| tokens per step | dispatches | " + " | ".join(names) + " |")
    print("| ---: | ---: |" + " ---: |" * len(kinds))
    for t in map(str, args.tokens):
        native_row, page_row = rows["native"][t], rows["page"][t]
        cells = [f"{native_row[k]:.3f} / {page_row[k]:.3f} ({page_row[k] / native_row[k]:.2f}x)" for k in kinds]
        print(f"| {t} | {native_row['dispatches']} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
