"""Where a decode step's host time goes, in the page's worker (Pyodide) and natively: cProfile of
one greedy generation through the same Python, side by side.

    python bench/profile_page.py [--tokens 128] [--top 25] [--backend webgpu]
    python bench/profile_page.py --long-prompt 512 --tokens 4   # 4 fresh 512-token prompts, 1 token each

Natively it profiles `Engine.generate` (wgpu-py); in Chromium the page's worker profiles
`WorkerHost.start_generation` and its `step()`s (what worker.js runs per message,
realm_web_host.py) on the page's own device, after a warm-up generation. Each side prints its
decode rate with the profiler on (it slows pure-Python code several times, so read the shares,
not the speed), then the functions with the most time of their own. Time a step spends waiting
for the GPU shows up in the function that waits (the native read-back's `map_sync`, the page's
JSPI `run_sync`), so what is left is the host's Python: what the page has to shed to reach native
speed (issue #10). With `--long-prompt N` each
"event" is instead the first token of a fresh N-token prompt (no prefix shared with any before):
the time to first token.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))  # the page helpers the e2e tests use

from bench_browser import PROMPT, browser, long_prompts  # noqa: E402
from harness import live_server, load, wait_ready  # noqa: E402

from realm_wasm.model_files import default_model_path  # noqa: E402

# Runs on either side: `generation` is an async callable producing the events of one generation.
PROFILE = '''
import cProfile, io, pstats, time

async def profiled(generation, tokens, top):
    async def run(n):
        count = 0
        async for _ in generation(n):
            count += 1
        return count
    await run(8)  # pipelines, caches
    profile = cProfile.Profile()
    t0 = time.perf_counter()
    profile.enable()
    count = await run(tokens)
    profile.disable()
    seconds = time.perf_counter() - t0
    text = io.StringIO()
    pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(top)
    rate = f"{count} events in {seconds * 1e3:.0f} ms ({count / seconds:.0f}/s with the profiler on)"
    return rate + "\\n" + text.getvalue()
'''


def prompts(long_prompt: int, count: int) -> list[str]:
    """`count` different prompts of about `long_prompt` tokens (none a prefix of another)."""
    return [long_prompts(long_prompt + i)[0] for i in range(count)]


def native(model: Path, tokens: int, top: int, backend: str, long_prompt: int) -> str:
    import asyncio

    from realm_wasm.engine import Engine

    engine = Engine.load(model, backend=backend)
    fresh = iter(prompts(long_prompt, 8 + tokens))

    async def generation(n: int):
        if long_prompt:  # n fresh prompts, their first token each
            for _ in range(n):
                for event in engine.generate(next(fresh), max_tokens=1):
                    yield event
        else:
            for event in engine.generate(PROMPT, max_tokens=n):
                yield event

    space: dict = {}
    exec(PROFILE, space)
    return asyncio.run(space["profiled"](generation, tokens, top))


def in_page_worker(model: Path, backend: str, code: str) -> Any:
    """`code`'s value, run by Pyodide in the page's worker once the page has loaded `model` on
    `backend` in headless Chromium (bench_browser.py's)."""
    from playwright.sync_api import sync_playwright

    with live_server((model.parent,), model.name) as server, sync_playwright() as pw, browser(pw) as p:
        p.goto(f"{server.url}?backend={backend}")
        wait_ready(p)
        assert load(p) == "loaded", p.inner_text("#error")
        return p.workers[0].evaluate("(code) => self.pyodide.runPythonAsync(code)", code)


def page(model: Path, tokens: int, top: int, backend: str, long_prompt: int) -> str:
    code = PROFILE + f'''
from realm_web_host import HOST
fresh = iter({prompts(long_prompt, 8 + tokens)!r})

def events(**request):  # as worker.js steps it
    generation = HOST.start_generation(**request)
    try:
        while (events := generation.step()) is not None:
            for event in events:
                yield event
    finally:
        generation.close()

async def generation(n):
    if {long_prompt}:  # n fresh prompts, their first token each
        for _ in range(n):
            for event in events(prompt=next(fresh), max_tokens=1):
                yield event
    else:
        for event in events(prompt={PROMPT!r}, max_tokens=n):
            yield event

await profiled(generation, {tokens}, {top})
'''
    return in_page_worker(model, backend, code)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--top", type=int, default=25, help="functions listed per side")
    parser.add_argument("--backend", default="webgpu", help="webgpu or numpy, on both sides")
    parser.add_argument("--model", type=Path, default=None, help="GGUF file (default: the bundled gemma-3-270m)")
    parser.add_argument("--long-prompt", type=int, default=0, help="profile first tokens of fresh N-token prompts")
    args = parser.parse_args()
    model = args.model or default_model_path()
    for where, run in (("native (wgpu-py)", native), ("page (Chromium worker)", page)):
        print(f"## {where}, {model.name}, {args.backend}, {args.tokens} tokens\n")
        print(run(model, args.tokens, args.top, args.backend, args.long_prompt))


if __name__ == "__main__":
    main()
