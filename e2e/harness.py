"""What the e2e tests and bench/bench_browser.py share: the site's assets, a live Realm server,
Chromium's flags, and the few page actions both perform (the page's protocol is its data-*
attributes: body[data-runtime|model|generation], #model-info, #output, #stats).
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import uvicorn
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from realm_server.app import create_app
from realm_server.static import RequestRecord, StaticSettings
from realm_wasm.chat_template import ChatTemplate
from realm_wasm.engine import Engine

ROOT = Path(__file__).resolve().parent.parent
# REALM_CHROMIUM and CHROMIUM_GPU_FLAGS: another Chromium (the GPU machine's, on its real adapter)
CHROMIUM = Path(os.environ.get("REALM_CHROMIUM", "/usr/bin/chromium"))
# WebGPU on SwiftShader without a GPU, and nothing that phones home (see shared ENVIRONMENT.md).
CHROMIUM_FLAGS = [*os.environ.get("CHROMIUM_GPU_FLAGS", "").split(),
    "--headless",
    "--no-sandbox",
    "--enable-unsafe-webgpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
BOOT_TIMEOUT_MS = 180_000  # a cold Pyodide boot takes 3-10 s on a busy 2-core machine
LOAD_TIMEOUT_MS = 300_000
# SwiftShader runs the WebGPU kernels on the CPU: the Paris prompt's prefill alone takes 30-90 s
GENERATE_TIMEOUT_MS = 600_000


# llama.cpp answers it "The primary colors are:\n\nRed (R)\nBlue (B)\nYellow (Y)" (golden chat_colors), and
# so does the page. Not the Paris question: llama.cpp answers that one "L'Étoile, la Marseillaise, ..." (its
# first two tokens 0.35 apart), the page with its kernel too, and a float32 engine "The capital of France is Paris."
QUESTION = "Name three primary colors."
# the golden LoRA adapter for the default model (../shared/golden/lora-gemma-3-270m), as the
# e2e server serves it (conftest's extra_models)
LORA_ADAPTER = "lora-golden.gguf"
SPLIT_MODEL = "smol-split-00001-of-00003.gguf"  # the chat model as three shards (extra_models)


def chromium_flags(webgpu: bool = True) -> list[str]:
    """Without --enable-unsafe-webgpu, Chromium offers no adapter on a machine without a GPU."""
    return [f for f in CHROMIUM_FLAGS if webgpu or f != "--enable-unsafe-webgpu"]


def build_site_assets() -> None:
    """Pyodide + numpy in web/vendor/pyodide, the runtime zip in web/dist (both idempotent)."""
    for script in ("vendor_pyodide.py", "build_bundle.py"):
        subprocess.run([sys.executable, str(ROOT / "scripts" / script)], check=True)


@dataclass
class LiveServer:
    url: str
    records: list[RequestRecord] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def log(self, record: RequestRecord) -> None:
        with self.lock:
            self.records.append(record)

    def requests(self, path: str) -> list[RequestRecord]:
        with self.lock:
            return [r for r in self.records if r.path == path]


def throttled(app: ASGIApp, rates: dict[str, float]) -> ASGIApp:
    """`app` with the bodies of the paths in `rates` sent at that many bytes a second: on loopback a
    whole file arrives before the page can act on its first bytes, so "stopped early" needs a slow
    link to mean anything."""
    async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
        rate = rates.get(scope.get("path")) if scope["type"] == "http" else None
        if rate is None:
            return await app(scope, receive, send)

        async def slow_send(message: Message) -> None:
            await send(message)
            if message["type"] == "http.response.body":
                await asyncio.sleep(len(message.get("body", b"")) / rate)

        return await app(scope, receive, slow_send)
    return wrapped


@contextmanager
def live_server(model_dirs: tuple[Path, ...], default_model: str,
                rates: dict[str, float] | None = None) -> Iterator[LiveServer]:
    """The static app on a real uvicorn at 127.0.0.1 (a port the OS picks), in a thread; the
    paths in `rates` are sent at that many bytes a second."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    live = LiveServer(url=f"http://127.0.0.1:{sock.getsockname()[1]}/")
    settings = StaticSettings(model_dirs=model_dirs, default_model=default_model, on_request=live.log)
    app = throttled(create_app(static=settings), rates or {})
    uv = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not uv.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.05)
    try:
        yield live
    finally:
        uv.should_exit = True
        thread.join(timeout=10)
        sock.close()


def wait_ready(page) -> None:
    page.wait_for_function("['ready', 'failed'].includes(document.body.dataset.runtime)",
                           timeout=BOOT_TIMEOUT_MS)
    assert page.evaluate("document.body.dataset.runtime") == "ready", page.inner_text("#error")


def load(page, url: str | None = None) -> str:
    """Load the selected model, or `url` (picked from the list when it is there, else typed in as
    another URL); returns the page's verdict, 'loaded' or 'failed'."""
    if url is not None:
        listed = page.eval_on_selector_all("#model-select option", "options => options.map(o => o.value)")
        if url in listed:
            page.select_option("#model-select", url)
        else:
            page.select_option("#model-select", "custom")
            page.fill("#model-url", url)
    page.click("#load")
    page.wait_for_function("['loaded', 'failed'].includes(document.body.dataset.model)",
                           timeout=LOAD_TIMEOUT_MS)
    return page.evaluate("document.body.dataset.model")


def generate(page, max_tokens: int, prompt: str | None = None, **settings: str) -> list[int]:
    """Run one generation to its end (greedy unless `settings` say otherwise, e.g. temperature=
    "0.8", **{"top-k": "12"}); returns the generated token ids the page exposes."""
    if prompt is not None:
        page.fill("#prompt", prompt)
    for name, value in {"max-tokens": str(max_tokens), "temperature": "0", **settings}.items():
        page.fill(f"#{name}", value)
    page.click("#generate")
    page.wait_for_function("['finished', 'stopped', 'failed'].includes(document.body.dataset.generation)",
                           timeout=GENERATE_TIMEOUT_MS)
    assert page.evaluate("document.body.dataset.generation") == "finished", page.inner_text("#error")
    return token_ids(page)


def load_adapter(page, url: str) -> str:
    """Load the adapter at `url` from the settings; returns the page's verdict, 'loaded' or 'failed'."""
    page.evaluate("delete document.body.dataset.adapter")
    page.fill("#adapter-url", url)
    page.click("#adapter-load")
    page.wait_for_function("['loaded', 'failed'].includes(document.body.dataset.adapter)", timeout=LOAD_TIMEOUT_MS)
    return page.evaluate("document.body.dataset.adapter")


def chat(page, message: str, max_tokens: int | None = None) -> dict:
    """Send one chat message and wait for the answer to finish; returns the answer's text and the
    numbers the page shows with it (data-* of its article)."""
    if max_tokens is not None:
        page.fill("#max-tokens", str(max_tokens))
    before = page.locator("#chat-log article[data-role=assistant]").count()
    page.fill("#chat-input", message)
    page.click("#send")
    page.wait_for_function("['finished', 'stopped', 'failed'].includes(document.body.dataset.generation)"
                           " && document.body.dataset.busy === ''", timeout=GENERATE_TIMEOUT_MS)
    assert page.evaluate("document.body.dataset.generation") == "finished", page.inner_text("#error")
    answers = page.locator("#chat-log article[data-role=assistant]")
    assert answers.count() == before + 1
    article = answers.nth(before)

    def number(name: str) -> int | None:
        value = article.get_attribute(f"data-{name}")
        return int(float(value)) if value else None

    ids = article.get_attribute("data-token-ids")
    return {"text": article.locator(".content").inner_text(), "ttft_ms": number("ttft-ms"),
            "tokens": number("tokens"), "prompt_tokens": number("prompt-tokens"),
            "cached_tokens": number("cached-tokens"), "token_ids": [int(i) for i in ids.split(",")] if ids else []}


def in_worker(page, python: str):
    """Run Python in the page's worker (its Pyodide); returns the value of the last expression."""
    return page.workers[0].evaluate("(code) => self.pyodide.runPython(code)", python)


def float32_matmuls(page) -> None:
    """Make the page's numpy executor multiply in float32 like the native one (for the next load)
    instead of with its SIMD kernel. The kernel rounds x to 8 bits per block as llama.cpp does;
    rounding is a step function, so the last-bit differences between Pyodide's numpy (no BLAS) and
    native numpy flip single roundings, and greedy answers part from any native oracle after some
    tokens. Tests of the chat itself compare with the native engine token for token, so they run
    float32; the kernel is judged against llama.cpp (e2e/test_cpu_kernels.py, test_embed.py)."""
    in_worker(page, "import realm_web_host; realm_web_host.CPU_KERNEL = False")


def token_ids(page) -> list[int]:
    ids = page.get_attribute("#output", "data-token-ids")
    return [int(i) for i in ids.split(",")] if ids else []


def generation_stats(page) -> dict[str, float | None]:
    """The last finished generation's numbers: time to first token, decode rate, token count."""
    data = page.locator("#stats")

    def number(name: str) -> float | None:
        value = data.get_attribute(f"data-{name}")
        return float(value) if value else None

    return {"ttft_ms": number("ttft-ms"), "decode_tok_s": number("tokens-per-second"), "tokens": number("tokens")}


class NativeChat:
    """The same conversation through the same template and engine, natively (the oracle)."""

    def __init__(self, path: Path) -> None:
        self.engine = Engine.load(path, backend="numpy", n_ctx=2048)
        self.template = ChatTemplate.from_metadata(self.engine.tokenizer, self.engine.model.header.metadata)

    def answer(self, messages: list[dict], max_tokens: int) -> dict:
        prompt = self.template.render(messages)
        ids = self.engine.tokenizer.encode(prompt.text, add_bos=prompt.add_bos)
        events = self.engine.generate(ids, max_tokens=max_tokens, stop=prompt.stop)
        out = []
        while True:
            try:
                out.append(next(events))
            except StopIteration as end:
                finished = end.value
                break
        return {"text": "".join(e.text for e in out), "token_ids": [e.token_id for e in out if e.token_id is not None],
                "prompt_tokens": finished.prompt_tokens, "cached_tokens": finished.cached_tokens}
