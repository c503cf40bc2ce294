"""A decode step's own cost on the GPU side, natively and in the page: the step's dispatches
submitted N times back to back, read back once at the end.

    python bench/bench_step_gpu.py [--steps 300] [--tokens 1 8] [--model F]

Decode in the page runs at a fraction of native speed while its worker waits for read-backs most
of each step (bench/profile_page.py). This takes the host out: the same step (T tokens at the
prompt's end, the model's real kernels through the executor's own dispatch list) queued N times,
so the time per step is what the GPU and, in Chromium, its GPU process take for one, with nothing
in between. If the page's step costs about native's, what is left is per step host time and
read-back latency the queue does not hide; if it costs more, the GPU side itself is slower there.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))  # the page helpers the e2e tests use

from bench_browser import browser  # noqa: E402
from harness import live_server, load, wait_ready  # noqa: E402

from realm_wasm.model_files import default_model_path  # noqa: E402

# Runs on either side with `executor` bound: ms per step for each step size.
STEPS = '''
import time
from realm_wasm.plan import Batch

async def step_ms(executor, steps, sizes):
    async def wait(read_back):
        return await read_back.result_async() if hasattr(read_back, "result_async") else read_back.result()

    out = {}
    for t in sizes:
        counts = executor._write_step(Batch.for_sequence([2] * t, 16))
        dispatches = executor._dispatches(counts)
        read = (executor.acts["logits"][0], 0, 16)
        await wait(executor.device.submit(dispatches, read=read))  # pipelines warm, queue empty
        t0 = time.perf_counter()
        for _ in range(steps - 1):
            executor.device.submit(dispatches)
        await wait(executor.device.submit(dispatches, read=read))
        out[t] = ((time.perf_counter() - t0) / steps * 1e3, len(dispatches))
    return out
'''


def native(model: Path, steps: int, sizes: list[int]) -> dict:
    import asyncio

    from realm_wasm.engine import Engine

    space: dict = {}
    exec(STEPS, space)
    return asyncio.run(space["step_ms"](Engine.load(model, backend="webgpu").executor, steps, sizes))


def page(model: Path, steps: int, sizes: list[int]) -> dict:
    from playwright.sync_api import sync_playwright

    code = STEPS + f'''
import json
from realm_web_host import HOST
json.dumps(await step_ms(HOST.loaded.engine.executor, {steps}, {sizes!r}))
'''
    with live_server((model.parent,), model.name) as server, sync_playwright() as pw, browser(pw) as p:
        p.goto(f"{server.url}?backend=webgpu")
        wait_ready(p)
        assert load(p) == "loaded", p.inner_text("#error")
        import json

        raw = json.loads(p.workers[0].evaluate("(code) => self.pyodide.runPythonAsync(code)", code))
        return {int(t): v for t, v in raw.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 8], help="tokens per step")
    parser.add_argument("--model", type=Path, default=None, help="GGUF file (default: the bundled gemma-3-270m)")
    args = parser.parse_args()
    model = args.model or default_model_path()
    rows = {where: run(model, args.steps, args.tokens) for where, run in (("native", native), ("page", page))}
    print(f"{model.name}, {args.steps} steps queued back to back, one read-back at the end\n")
    print("| tokens per step | dispatches | native ms/step | page ms/step | page / native |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for t in args.tokens:
        (n_ms, count), (p_ms, _) = rows["native"][t], rows["page"][t]
        print(f"| {t} | {count} | {n_ms:.3f} | {p_ms:.3f} | {p_ms / n_ms:.2f}x |")


if __name__ == "__main__":
    main()
