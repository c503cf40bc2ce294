"""Load test of the inference API: many concurrent streaming requests from several tenants, one server.

    python bench/bench_server.py --requests 32 --max-tokens 32 --slots 8

Starts `realm serve` (as `python -m realm_server serve`; the default model unless --model, a
temporary tenants file) in its own process on a free port; like any `realm serve` it first makes
sure web/vendor (Pyodide) and the runtime bundle are in place. Runs each distinct prompt alone
first (greedy: the expected text, and the latency of a request with the server to itself), then
all requests at once, and prints a table: requests completed, how many match their text run
alone, p50/p95 latency and time to first token, aggregate generated tokens/s, and /health latency
while the server is loaded. First, in this process, the engine decodes --decode-tokens alone
(`Engine.generate`, the same loop the server runs), and one stream through the server does the
same: their decode tokens/s side by side (first token to last, best of --repeats runs each, every
run listed) say what the server's transport costs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from realm_server.tenants import hash_key  # noqa: E402  (the repo root goes on sys.path first)

PROMPTS = ["Question: What is the capital of France?\nAnswer:", "Once upon a time", "The three primary colors are",
           "def fibonacci(n):", "The largest planet in the solar system is", "Water boils at",
           "A haiku about the sea:\n", "The recipe for pancakes:\n1."]


def engine_decode(model: str | None, backend: str, n_ctx: int, tokens: int, repeats: int) -> tuple[list[float], str]:
    """Decode tokens/s of the engine alone, in this process, each of `repeats` runs: first generated
    token to last."""
    from realm_wasm.engine import Engine
    from realm_wasm.model_files import resolve_model

    engine = Engine.load(resolve_model(model), backend=backend, n_ctx=n_ctx)
    rates = []
    for _ in range(repeats):
        times = [e.elapsed_s for e in engine.generate(PROMPTS[1], tokens, stop_at_eos=False) if e.token_id is not None]
        rates.append((len(times) - 1) / (times[-1] - times[0]))
    return rates, engine.executor.name


async def stream_decode(url: str, key: str, tokens: int) -> float:
    """Decode tokens/s of one stream through the server: first text chunk to last (one chunk per token)."""
    async with httpx.AsyncClient(base_url=url, timeout=3600) as c:
        model = (await c.get("/v1/models", headers={"Authorization": f"Bearer {key}"})).json()["data"][0]["id"]
        body = {"model": model, "prompt": PROMPTS[1], "max_tokens": tokens, "temperature": 0, "stream": True}
        arrivals = []
        async with c.stream("POST", "/v1/completions", json=body, headers={"Authorization": f"Bearer {key}"}) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    arrivals.append(time.perf_counter())
    return (len(arrivals) - 2) / (arrivals[-2] - arrivals[0])  # the last chunk only says why it ended


@dataclass
class Result:
    tenant: str
    prompt: str
    text: str
    tokens: int
    start: float
    first: float | None  # when the first text arrived
    end: float

    @property
    def latency(self) -> float:
        return self.end - self.start

    @property
    def ttft(self) -> float:
        return (self.first or self.end) - self.start


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_tenants(folder: Path, n: int) -> dict[str, str]:
    keys = {f"tenant{i}": f"bench-key-{i}" for i in range(n)}
    (folder / "tenants.toml").write_text("".join(
        f'[[tenant]]\nid = "{tenant}"\nkey_sha256 = "{hash_key(key)}"\n\n' for tenant, key in keys.items()))
    return keys


async def stream(client: httpx.AsyncClient, model: str, key: str, tenant: str, prompt: str,
                 max_tokens: int) -> Result:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    parts, tokens, first = [], 0, None
    start = time.perf_counter()
    async with client.stream("POST", "/v1/completions", json=body, headers={"Authorization": f"Bearer {key}"}) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            if event["choices"] and event["choices"][0]["text"]:
                first = first or time.perf_counter()
                parts.append(event["choices"][0]["text"])
    return Result(tenant, prompt, "".join(parts), tokens, start, first, time.perf_counter())


async def watch_health(client: httpx.AsyncClient, until: asyncio.Future, out: list[float]) -> None:
    while not until.done():
        t0 = time.perf_counter()
        (await client.get("/health")).raise_for_status()
        out.append(time.perf_counter() - t0)
        await asyncio.sleep(0.25)


def listed(rates: list[float]) -> str:
    return ", ".join(f"{r:.1f}" for r in rates)


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


async def run(url: str, keys: dict[str, str], n_requests: int, max_tokens: int) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=3600, limits=httpx.Limits(max_connections=n_requests + 8)) as c:
        model = (await c.get("/v1/models", headers={"Authorization": f"Bearer {next(iter(keys.values()))}"})
                 ).json()["data"][0]["id"]
        tenants = list(keys)
        jobs = [(tenants[i % len(tenants)], PROMPTS[i % len(PROMPTS)]) for i in range(n_requests)]
        alone = {}
        for prompt in dict.fromkeys(p for _, p in jobs):
            alone[prompt] = await stream(c, model, keys[tenants[0]], tenants[0], prompt, max_tokens)
        t0 = time.perf_counter()
        everything = asyncio.gather(*(stream(c, model, keys[t], t, p, max_tokens) for t, p in jobs),
                                    return_exceptions=True)
        health: list[float] = []
        await watch_health(c, everything, health)
        results = await everything
        wall = time.perf_counter() - t0

    done = [r for r in results if isinstance(r, Result)]
    same = sum(r.text == alone[r.prompt].text for r in done)
    rows = [("alone, one at a time", list(alone.values()), sum(r.latency for r in alone.values())),
            (f"{n_requests} concurrent, {len(tenants)} tenants", done, wall)]
    print(f"model {model}, max_tokens {max_tokens}, greedy, streaming (SSE)\n")
    print("| scenario | requests | completed | same text as alone | p50 latency s | p95 latency s "
          "| p50 TTFT s | p95 TTFT s | tokens | wall s | aggregate tok/s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, rs, seconds in rows:
        lat, ttft = [r.latency for r in rs], [r.ttft for r in rs]
        tokens = sum(r.tokens for r in rs)
        matches = len(rs) if rs is not done else same
        print(f"| {name} | {len(rs)} | {len(rs)} | {matches} | {pct(lat, 50):.2f} | {pct(lat, 95):.2f} "
              f"| {pct(ttft, 50):.2f} | {pct(ttft, 95):.2f} | {tokens} | {seconds:.1f} | {tokens / seconds:.1f} |")
    print(f"\n/health while loaded: {len(health)} probes, p50 {pct(health, 50) * 1000:.0f} ms, "
          f"p95 {pct(health, 95) * 1000:.0f} ms, max {max(health) * 1000:.0f} ms")
    lost = [r for r in results if not isinstance(r, Result)]
    if lost:
        print(f"\n{len(lost)} requests FAILED: {lost[:3]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--tenants", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--model", help="GGUF file (default: the bundled gemma-3-270m Q4_K_M)")
    parser.add_argument("--backend", default="auto", help="auto, webgpu or numpy (realm_wasm.backends)")
    parser.add_argument("--decode-tokens", type=int, default=256, help="tokens of the one-stream decode comparison")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each side of the one-stream comparison (best)")
    args = parser.parse_args()
    engine_rates, engine_executor = engine_decode(args.model, args.backend, args.ctx, args.decode_tokens, args.repeats)
    with tempfile.TemporaryDirectory() as tmp:
        keys = write_tenants(Path(tmp), args.tenants)
        port = free_port()
        command = [sys.executable, "-m", "realm_server", "serve", "--tenants", str(Path(tmp) / "tenants.toml"),
                   "--port", str(port), "--slots", str(args.slots), "--ctx", str(args.ctx), "--backend", args.backend]
        log = (Path(tmp) / "server.log").open("w")
        server = subprocess.Popen(command + (["--model", args.model] if args.model else []), cwd=ROOT,
                                  env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [
                                      str(ROOT), os.environ.get("PYTHONPATH")]))},
                                  stdout=log, stderr=log)
        try:
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 600
            while True:
                try:
                    httpx.get(url + "/health").raise_for_status()
                    break
                except httpx.HTTPError:
                    if server.poll() is not None or time.monotonic() > deadline:
                        tail = (Path(tmp) / "server.log").read_text()[-2000:]
                        raise SystemExit(f"the server did not start:\n{tail}") from None
                    time.sleep(0.5)
            executor = httpx.get(url + "/health").json()["models"]
            print(f"{os.cpu_count()} CPUs, {args.slots} KV slots, executor "
                  f"{', '.join(m['executor'] for m in executor.values())}\n")
            server_rates = [asyncio.run(stream_decode(url, next(iter(keys.values())), args.decode_tokens))
                            for _ in range(args.repeats)]
            print(f"| one sequence, {args.decode_tokens} tokens | decode tok/s, best of {args.repeats} | runs |\n"
                  f"| --- | ---: | --- |\n"
                  f"| Engine.generate ({engine_executor}), this process | {max(engine_rates):.1f} "
                  f"| {listed(engine_rates)} |\n"
                  f"| one stream through realm serve (SSE) | {max(server_rates):.1f} | {listed(server_rates)} |\n"
                  f"| ratio | {max(server_rates) / max(engine_rates):.3f} | |\n")
            asyncio.run(run(url, keys, args.requests, args.max_tokens))
        finally:
            server.terminate()
            server.wait(timeout=60)
            log.close()


if __name__ == "__main__":
    main()
