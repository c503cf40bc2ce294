"""Realm's page in headless Chromium against wllama (llama.cpp in wasm), in the same browser, same GGUF.

    python bench/bench_browser.py [--tokens 16] [--webgpu-tokens 3] [--threads 1 2] [--no-wllama]
                                  [--no-webgpu] [--no-numpy] [--no-numpy-dequant] [--native]
                                  [--long-prompt 512] [--model F] [--run-ahead N] [--steps-per-submit N]
                                  [--lookup]

For each of Realm's executors (WebGPU, forced even where the page would pick numpy; numpy with its
WebAssembly SIMD kernel; numpy without it, dequantizing as before the kernel) and for wllama on the
CPU: cold load (download to ready), warm load (the same page reloaded, model from the browser's
storage), time to first token and decode tokens/s, greedy, on the Paris prompt. Prints a markdown
table, and numpy's decode against wllama's. On a machine without a GPU, Chromium's WebGPU adapter
is SwiftShader (a CPU rasterizer): the WebGPU row measures that, not a GPU. On the GPU machine
(REALM_CHROMIUM, CHROMIUM_GPU_FLAGS: ../shared/gpu-machine), `--native` adds wgpu-py in this
process on the same prompts, and `--long-prompt N` times a first and a second generation of two
different N-token prompts after the load (pipelines compiled at load: the first within 1.5x of
the second), each row against native.

wllama is installed with npm into the cache (~/.cache/realm/wllama; REALM_CACHE moves it), never into
the repository, and served with COOP/COEP headers so its multi-threaded build can run.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))  # the page helpers the e2e tests use

from bench_speculative import WORKLOADS  # noqa: E402
from harness import (  # noqa: E402
    CHROMIUM,
    build_site_assets,
    chromium_flags,
    float32_matmuls,
    generate,
    generation_stats,
    in_worker,
    live_server,
    load,
    wait_ready,
)

from realm_wasm.model_files import cache_dir, default_model_path  # noqa: E402
from realm_wasm.speculative import Speculation  # noqa: E402

PROMPT = "Question: What is the capital of France?\nAnswer:"
REWRITE = "rewrite a paragraph (one word changed)"  # --lookup's workload (bench_speculative.py)
LOOKUP_K = 8
WLLAMA = "@wllama/wllama@3.8.1"

# wllama's side: one page that loads the model and streams a greedy completion, timing both.
WLLAMA_PAGE = """<!doctype html>
<meta charset="utf-8">
<script type="module">
import { Wllama } from "./wllama/index.js";

window.runWllama = async ({ prompt, tokens, threads }) => {
  const wllama = new Wllama({ default: "./wllama/wasm/wllama.wasm" }, { suppressNativeLog: true });
  let t0 = performance.now();
  await wllama.loadModelFromUrl(new URL("model.gguf", location.href).href,
    { n_threads: threads, n_gpu_layers: 0, n_ctx: 2048 });
  const loadMs = performance.now() - t0;
  t0 = performance.now();
  let firstMs = null;
  let text = "";
  let timings = null;
  const stream = await wllama.createCompletion({ prompt, max_tokens: tokens, temperature: 0, stream: true });
  for await (const chunk of stream) {
    const piece = chunk.choices?.[0]?.text ?? "";
    if (firstMs === null && piece) firstMs = performance.now() - t0;
    text += piece;
    timings = chunk.timings ?? timings;
  }
  await wllama.exit();
  return { loadMs, firstMs, text, timings, isolated: self.crossOriginIsolated };
};
</script>
"""


class IsolatedHandler(http.server.SimpleHTTPRequestHandler):
    """Static files with the headers that give a page SharedArrayBuffer (wasm threads)."""

    extensions_map = {**http.server.SimpleHTTPRequestHandler.extensions_map,
                      ".wasm": "application/wasm", ".js": "text/javascript", ".html": "text/html"}

    def end_headers(self) -> None:
        self.send_header("Cross-Origin-Opener-Policy", "same-origin")
        self.send_header("Cross-Origin-Embedder-Policy", "require-corp")
        super().end_headers()

    def log_message(self, *args) -> None:
        pass


@contextmanager
def isolated_server(root: Path) -> Iterator[str]:
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(IsolatedHandler, directory=root))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_port}/"
    finally:
        httpd.shutdown()


@contextmanager
def browser(playwright, webgpu: bool = True) -> Iterator:
    """A Chromium context on a fresh persistent profile (its cache survives page reloads)."""
    with tempfile.TemporaryDirectory() as profile:
        context = playwright.chromium.launch_persistent_context(
            profile, executable_path=str(CHROMIUM), headless=True, args=chromium_flags(webgpu))
        try:
            yield context.pages[0] if context.pages else context.new_page()
        finally:
            context.close()


def long_prompts(n_tokens: int) -> tuple[str, str]:
    """Two different texts of about n_tokens tokens each for the default model (a first and a
    second prompt after a load: the second shares no prefix with the first)."""
    words = ("river stone harbour lantern orchard meadow copper violet thunder quiet window "
             "market ladder garden silver candle forest engine saddle marble").split()
    rng = random.Random(n_tokens)
    # no ending: a model that ends its text at once reports no first token (the page stops at end of text)
    return tuple(" ".join(rng.choice(words) for _ in range(n_tokens - 8)) + ", and then the" for _ in range(2))


def bench_native(model: Path, tokens: int, long_prompt: int, prompt: str = PROMPT, lookup: bool = False) -> dict:
    """wgpu-py in this process (the same executor code the page runs, natively): the Paris prompt's
    TTFT and decode, and a long prompt's TTFT."""
    from realm_wasm.engine import Engine

    engine = Engine.load(model, backend="webgpu", n_ctx=2048)
    t0 = time.perf_counter()
    speculation = Speculation("lookup", max_draft=LOOKUP_K) if lookup else None
    events = [e for e in engine.generate(prompt, tokens, stop_at_eos=False, speculation=speculation)
              if e.token_id is not None]
    row = {"engine": f"native wgpu-py ({engine.executor.name}), this process", "cold_s": time.perf_counter() - t0,
           "warm_s": None, "ttft_ms": events[0].elapsed_s * 1e3,
           "decode": (len(events) - 1) / (events[-1].elapsed_s - events[0].elapsed_s), "heap_mb": None,
           "answer": "".join(e.text for e in events), "tokens": tokens}
    if long_prompt:
        ttfts = []
        for text in long_prompts(long_prompt):
            first = next(iter(engine.generate(text, 2, stop_at_eos=False)))
            ttfts.append(first.elapsed_s * 1e3)
        row["long_ttft_ms"] = ttfts
    return row


def bench_realm(playwright, url: str, backend: str, tokens: int, cpu_kernel: bool = True,
                long_prompt: int = 0, setup: str = "", prompt: str = PROMPT, lookup: bool = False) -> dict:
    with browser(playwright) as page:
        page.goto(f"{url}?backend={backend}")
        wait_ready(page)
        adapter = page.text_content("#gpu-info")  # the page's adapter and which of Realm's features it has

        def load_ms() -> float:
            if not cpu_kernel:
                float32_matmuls(page)
            if setup:
                in_worker(page, setup)
            assert load(page) == "loaded", page.inner_text("#error")
            return float(page.get_attribute("#model-info", "data-load-ms"))

        cold = load_ms()
        heap = int(page.get_attribute("#model-info", "data-wasm-heap-bytes"))
        long_ttft = []
        for text in long_prompts(long_prompt) if long_prompt else ():  # first and second after the load
            generate(page, 2, text)
            long_ttft.append(generation_stats(page)["ttft_ms"])
        if lookup:
            page.check("#lookup")
        generate(page, tokens, prompt)
        answer = page.inner_text("#answer")
        measured = generation_stats(page)
        page.reload()
        wait_ready(page)
        warm = load_ms()
    engine = {"webgpu": "Realm, webgpu executor", "numpy": "Realm, numpy executor, WebAssembly SIMD kernel"}[backend]
    if not cpu_kernel:
        engine = "Realm, numpy executor, numpy dequantization (no kernel)"
    return {"engine": engine, "cold_s": cold / 1e3, "warm_s": warm / 1e3,
            "ttft_ms": measured["ttft_ms"], "decode": measured["decode_tok_s"], "heap_mb": heap / 1e6,
            "answer": answer, "tokens": tokens, "adapter": adapter,
            **({"long_ttft_ms": long_ttft} if long_ttft else {})}


def install_wllama() -> Path:
    prefix = cache_dir().parent / "wllama"
    esm = prefix / "node_modules" / "@wllama" / "wllama" / "esm"
    if not (esm / "index.js").exists():
        prefix.mkdir(parents=True, exist_ok=True)
        subprocess.run(["npm", "install", "--prefix", str(prefix), "--no-audit", "--no-fund", WLLAMA], check=True)
    return esm


def bench_wllama(playwright, model: Path, tokens: int, threads: int) -> dict:
    esm = install_wllama()
    with tempfile.TemporaryDirectory() as site:
        root = Path(site)
        (root / "index.html").write_text(WLLAMA_PAGE)
        (root / "wllama").symlink_to(esm)
        (root / "model.gguf").symlink_to(model)
        with isolated_server(root) as url, browser(playwright) as page:
            args = {"prompt": PROMPT, "tokens": tokens, "threads": threads}
            runs = []
            for _ in range(2):  # cold, then warm: wllama keeps the model in the browser's storage
                page.goto(url)
                runs.append(page.evaluate("(args) => window.runWllama(args)", args))
    cold, warm = runs  # the generation measured is the cold run's, as for Realm
    threads_used = threads if cold["isolated"] else 1
    return {"engine": f"wllama 3.8.1, CPU, {threads_used} thread(s)", "cold_s": cold["loadMs"] / 1e3,
            "warm_s": warm["loadMs"] / 1e3, "ttft_ms": cold["firstMs"],
            "decode": cold["timings"]["predicted_per_second"], "heap_mb": None, "answer": cold["text"],
            "tokens": tokens}


def table(rows: list[dict]) -> str:
    native = next((r for r in rows if r["engine"].startswith("native")), None)
    lines = ["| engine | cold load s | warm load s | TTFT ms | decode tok/s | decode vs native | long prompt TTFT "
             "ms, 1st / 2nd | wasm heap MB | answer |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        heap = "—" if r["heap_mb"] is None else f"{r['heap_mb']:.0f}"
        decode = "—" if r["decode"] is None else f"{r['decode']:.2f}"
        ratio = f"{r['decode'] / native['decode']:.2f}x" if native and r["decode"] else "—"
        long = " / ".join("?" if t is None else f"{t:.0f}" for t in r["long_ttft_ms"]) if r.get("long_ttft_ms") else "—"
        warm = "—" if r["warm_s"] is None else f"{r['warm_s']:.1f}"
        answer = r["answer"].replace("\n", "\\n")
        lines.append(f"| {r['engine']} | {r['cold_s']:.1f} | {warm} | {r['ttft_ms']:.0f} | {decode} | {ratio} "
                     f"| {long} | {heap} | `{answer}` ({r['tokens']} tokens) |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=16, help="tokens generated by numpy and wllama")
    ap.add_argument("--webgpu-tokens", type=int, default=3, help="tokens generated on WebGPU (slow on SwiftShader)")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2],
                    help="wllama thread counts, one row each (2 threads slow down badly when another "
                         "process takes a core: ggml's threads wait for each other)")
    ap.add_argument("--no-wllama", action="store_true", help="skip the reference")
    ap.add_argument("--no-webgpu", action="store_true", help="skip the WebGPU row")
    ap.add_argument("--no-numpy-dequant", action="store_true", help="skip numpy without its kernel")
    ap.add_argument("--no-numpy", action="store_true", help="skip the numpy rows (a model the wasm heap cannot hold)")
    ap.add_argument("--native", action="store_true", help="add wgpu-py in this process (on a machine with a GPU)")
    ap.add_argument("--long-prompt", type=int, default=0, help="also time two N-token prompts after each load")
    ap.add_argument("--model", help="GGUF file (default: the bundled gemma-3-270m)")
    ap.add_argument("--lookup", action="store_true", help=f"decode with prompt lookup (k={LOOKUP_K}) on "
                    "bench_speculative.py's paragraph rewrite, natively and on WebGPU in the page")
    ap.add_argument("--run-ahead", type=int, help="decode steps queued behind the one being read (the "
                    "devices' run_ahead), natively and in the page")
    ap.add_argument("--steps-per-submit", type=int, help="decode steps one submit holds (the devices' "
                    "steps_per_submit), natively and in the page")
    args = ap.parse_args()
    from realm_wasm.gpu.native import NativeDevice

    # device settings, set here on NativeDevice and in the page (its worker runs `setup`) on BrowserDevice
    settings = {name: value for name, value in (("run_ahead", args.run_ahead),
                                                 ("steps_per_submit", args.steps_per_submit)) if value is not None}
    for name, value in settings.items():
        setattr(NativeDevice, name, value)
    setup = "; ".join(["from realm_wasm.gpu.browser import BrowserDevice"] * bool(settings)
                      + [f"BrowserDevice.{name} = {value}" for name, value in settings.items()])

    from playwright.sync_api import sync_playwright

    model = Path(args.model) if args.model else default_model_path()
    build_site_assets()
    load_before = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    prompt = WORKLOADS[REWRITE] if args.lookup else PROMPT
    rows = [bench_native(model, args.webgpu_tokens, args.long_prompt, prompt, args.lookup)] if args.native else []
    with live_server((model.parent,), model.name) as server, sync_playwright() as playwright:
        runs = [] if args.no_webgpu else [("webgpu", args.webgpu_tokens, True)]
        if not args.no_numpy:
            runs.append(("numpy", args.tokens, True))
        if not (args.no_numpy or args.no_numpy_dequant):
            runs.append(("numpy", args.tokens, False))
        for backend, n, cpu_kernel in runs:
            t0 = time.monotonic()
            rows.append(bench_realm(playwright, server.url, backend, n, cpu_kernel,
                                    args.long_prompt if backend == "webgpu" else 0, setup, prompt,
                                    args.lookup and backend == "webgpu"))
            print(f"measured {rows[-1]['engine']} in {time.monotonic() - t0:.0f} s", file=sys.stderr)
        for threads in [] if args.no_wllama else args.threads:
            rows.append(bench_wllama(playwright, model, args.tokens, threads))
    loadavg = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    how = "greedy, prompt lookup" if args.lookup else "greedy"
    print(f"Headless Chromium, {model.name}, prompt {prompt!r}, {how}; {os.cpu_count()} CPUs, load average "
          f"{load_before} before the run, {loadavg} after (other processes slow every row).\n")
    page_rows = [r for r in rows if r.get("adapter")]
    if page_rows:
        print(f"The page's WebGPU adapter: {page_rows[0]['adapter']}\n")
    print(table(rows))
    numpy = next((r for r in rows if r["engine"].endswith("SIMD kernel")), None)
    for r in rows:
        if numpy and r["engine"].startswith("wllama") and r["decode"]:
            print(f"\nnumpy executor with its kernel (1 thread) / {r['engine']}: {numpy['decode'] / r['decode']:.2f}x")


if __name__ == "__main__":
    main()
