"""What a dispatch, a submit and a read-back cost on the page's WebGPU next to wgpu-py natively.

    python bench/bench_webgpu_overhead.py [--dispatches 140] [--steps 300]

A decode step of the default model is one submit of ~140 small dispatches that ends by reading a
few bytes back (realm plan). This runs steps of that shape with a kernel that does almost nothing,
through the same `Device` seam the executor uses (realm_wasm/gpu/device.py), natively and in the
page's worker in Chromium (its Pyodide, its BrowserDevice), and prints per-step costs: what is
left is what the host and the browser's GPU process add, not the GPU's work.

- round trip: one dispatch a step, each step's bytes read before the next is submitted
- step, waited: D dispatches a step, read before the next
- step, N queued: D dispatches a step, N steps submitted ahead of the one being read (as the
  scheduler runs ahead), and the same with 4·D dispatches: their difference over 3·D is the cost of
  one more dispatch.
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "e2e"))

KERNEL = """
@group(0) @binding(0) var<storage, read> a: array<f32>;
@group(0) @binding(1) var<storage, read> b: array<f32>;
@group(0) @binding(2) var<storage, read> c: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;
@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) g: vec3u) {
    out[g.x] = a[g.x] + b[g.x] * c[g.x];
}
"""


async def measure(device, dispatches: int, steps: int, queued: int) -> dict:
    """ms per step for each case, on `device` (a realm_wasm.gpu Device)."""
    import time
    from collections import deque

    from realm_wasm.gpu.device import STORAGE_RW

    buffers = [device.create_buffer(256, STORAGE_RW, f"b{i}") for i in range(8)]
    pipeline = device.create_pipeline(KERNEL, "main", "overhead")
    groups = [device.create_bind_group(pipeline, [(buffers[(i + j) % 8], 0, 256) for j in range(4)])
              for i in range(4 * dispatches)]
    programs = {n: [(pipeline, groups[i], (1, 1, 1)) for i in range(n)] for n in (1, dispatches, 4 * dispatches)}
    read = (buffers[3], 0, 16)

    async def wait(pending):
        return await pending.result_async() if hasattr(pending, "result_async") else pending.result()

    async def run(n: int, ahead: int) -> float:
        program, in_flight = programs[n], deque()
        for _ in range(ahead + 1):  # warm-up
            await wait(device.submit(program, read=read))
        t0 = time.perf_counter()
        for _ in range(steps):
            in_flight.append(device.submit(program, read=read))
            if len(in_flight) > ahead:
                await wait(in_flight.popleft())
        while in_flight:
            await wait(in_flight.popleft())
        return (time.perf_counter() - t0) * 1e3 / steps

    queued_d, queued_4d = await run(dispatches, queued), await run(4 * dispatches, queued)
    return {"round trip": await run(1, 0), "step, waited": await run(dispatches, 0),
            f"step, {queued} queued": queued_d, f"4x dispatches, {queued} queued": queued_4d,
            "one more dispatch (us)": (queued_4d - queued_d) * 1e3 / (3 * dispatches)}


def native(dispatches: int, steps: int, queued: int) -> dict:
    import asyncio

    from realm_wasm.gpu.native import NativeDevice

    return asyncio.run(measure(NativeDevice.create(), dispatches, steps, queued))


def page(dispatches: int, steps: int, queued: int) -> dict:
    """The same function in the page's worker (Pyodide) on a BrowserDevice of its own."""
    from bench_browser import browser
    from harness import live_server, wait_ready
    from playwright.sync_api import sync_playwright

    from realm_wasm.model_files import default_model_path

    code = (f"KERNEL = {KERNEL!r}\n" + inspect.getsource(measure) + "\n"
            "from realm_wasm.gpu.browser import BrowserDevice\n"
            f"json.dumps(await measure(await BrowserDevice.create(), {dispatches}, {steps}, {queued}))")
    model = default_model_path()
    with live_server((model.parent,), model.name) as server, sync_playwright() as pw, browser(pw) as p:
        p.goto(f"{server.url}?backend=webgpu")
        wait_ready(p)
        return json.loads(p.workers[0].evaluate("(code) => self.pyodide.runPythonAsync(code)", "import json\n" + code))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dispatches", type=int, default=140, help="dispatches a step (the default model: ~140)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--queued", type=int, default=3, help="steps submitted ahead (a device's run_ahead)")
    args = parser.parse_args()
    t0 = time.perf_counter()
    where = {"wgpu-py": native(args.dispatches, args.steps, args.queued),
             "page (Chromium)": page(args.dispatches, args.steps, args.queued)}
    cases = list(where["wgpu-py"])
    head = f"ms a step ({args.dispatches} dispatches, {args.steps} steps)"
    print(f"| {head} | " + " | ".join(where) + " | page / native |")
    print("|---|" + "---:|" * (len(where) + 1))
    for case in cases:
        a, b = where["wgpu-py"][case], where["page (Chromium)"][case]
        print(f"| {case} | {a:.3f} | {b:.3f} | {b / a:.2f}x |")
    print(f"\n({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
