"""Native decode next to other users of the same GPU: is the page's slow mode the browser's other
GPU contexts (issue #10)?

    python bench/bench_gpu_neighbours.py --model /tmp/model.gguf [--tokens 256] [--repeats 2]

On the GPU machine (REALM_CHROMIUM, CHROMIUM_GPU_FLAGS: ../shared/gpu-machine). wgpu-py decodes
in this process (`Engine.generate`, greedy, best of --repeats) while, in another process, one of:
nothing; a wgpu device that sits idle; a wgpu device that submits a tiny kernel every ~1 ms;
headless Chromium on a still page; on a page whose CSS animation makes the compositor draw every
frame; the same with `--disable-gpu-compositing`; on a page that holds an idle WebGPU device. An
NVIDIA GPU time-slices between contexts that have work: whichever row halves decode names the
neighbour that costs the page its speed. Prints a markdown table, each row against "alone".
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from realm_wasm.engine import Engine  # noqa: E402

PROMPT = "Once upon a time"

# a wgpu device in another process: idle, or a one-workgroup kernel every ~1 ms
WGPU_NEIGHBOUR = """
import sys, time, wgpu
device = wgpu.gpu.request_adapter_sync(power_preference="high-performance").request_device_sync()
print("ready", flush=True)
if sys.argv[1] == "idle":
    time.sleep(3600)
buf = device.create_buffer(size=64, usage=wgpu.BufferUsage.STORAGE | wgpu.BufferUsage.COPY_SRC)
shader = device.create_shader_module(code="@group(0) @binding(0) var<storage, read_write> b: array<u32>;"
                                          "@compute @workgroup_size(1) fn main() { b[0] += 1u; }")
pipe = device.create_compute_pipeline(layout="auto", compute={"module": shader, "entry_point": "main"})
bg = device.create_bind_group(layout=pipe.get_bind_group_layout(0),
                              entries=[{"binding": 0, "resource": {"buffer": buf}}])
while True:
    enc = device.create_command_encoder()
    p = enc.begin_compute_pass()
    p.set_pipeline(pipe); p.set_bind_group(0, bg); p.dispatch_workgroups(1); p.end()
    device.queue.submit([enc.finish()])
    device.queue.read_buffer(buf)  # waits for the kernel
    time.sleep(0.001)
"""

STILL = "<p>still</p>"
ANIMATED = ("<style>@keyframes r{to{transform:rotate(360deg)}}div{width:80px;height:80px;background:#48c;"
            "animation:r 1s linear infinite}</style><div></div>")
WEBGPU_IDLE = ("<p id=s>asking</p><script>navigator.gpu.requestAdapter().then(a=>a.requestDevice())"
               ".then(d=>{window.dev=d;document.getElementById('s').textContent='device'})</script>")


def decode_rate(engine: Engine, tokens: int, repeats: int) -> float:
    best = 0.0
    for _ in range(repeats):
        times = [e.elapsed_s for e in engine.generate(PROMPT, tokens, stop_at_eos=False) if e.token_id is not None]
        best = max(best, (len(times) - 1) / (times[-1] - times[0]))
    return best


@contextmanager
def neighbour(kind: str) -> Iterator[None]:
    """Run the named neighbour in another process for the duration."""
    if kind == "alone":
        yield
        return
    if kind.startswith("wgpu"):
        proc = subprocess.Popen([sys.executable, "-c", WGPU_NEIGHBOUR, kind.split()[1]], stdout=subprocess.PIPE,
                                text=True)
        assert proc.stdout.readline().strip() == "ready", "the wgpu neighbour did not start"
    else:
        page, *extra = {"chromium, still page": (STILL,), "chromium, animated page": (ANIMATED,),
                        "chromium, animated page, --disable-gpu-compositing": (ANIMATED, "--disable-gpu-compositing"),
                        "chromium, page holding an idle WebGPU device": (WEBGPU_IDLE,)}[kind]
        profile = tempfile.mkdtemp(prefix="realm-neighbour-")
        env = dict(os.environ, LD_LIBRARY_PATH="/tmp/gpu-base/lib")
        proc = subprocess.Popen([os.environ.get("REALM_CHROMIUM", "chromium"),
                                 *os.environ.get("CHROMIUM_GPU_FLAGS", "--headless=new --no-sandbox").split(),
                                 *extra, f"--user-data-dir={profile}", "--remote-debugging-port=0",
                                 "data:text/html," + urllib.parse.quote(page)],
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(4)  # the GPU process up and the page drawn (or its device made)
        assert proc.poll() is None, f"Chromium exited with {proc.returncode}"
    try:
        yield
    finally:
        proc.kill()
        proc.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    engine = Engine.load(args.model, backend="webgpu", n_ctx=args.tokens + 64)
    decode_rate(engine, 16, 1)  # pipelines warm
    kinds = ["alone", "wgpu idle", "wgpu busy", "chromium, still page", "chromium, animated page",
             "chromium, animated page, --disable-gpu-compositing", "chromium, page holding an idle WebGPU device",
             "alone"]
    rows = []
    for kind in kinds:
        with neighbour(kind):
            rows.append((kind, decode_rate(engine, args.tokens, args.repeats)))
        print(f"{kind}: {rows[-1][1]:.0f} tok/s", file=sys.stderr)
    alone = rows[0][1]
    print(f"\n{Path(args.model).name}, native decode of {args.tokens} tokens (best of {args.repeats}) "
          "with another process on the GPU\n")
    print("| the other process | decode tok/s | vs alone |\n| --- | ---: | ---: |")
    for kind, rate in rows:
        print(f"| {kind} | {rate:,.0f} | {rate / alone:.2f}x |")


if __name__ == "__main__":
    main()
