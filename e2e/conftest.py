"""End-to-end fixtures: vendored Pyodide + bundle, a real uvicorn server, headless Chromium.

Needs `pip install playwright` and Debian's chromium at /usr/bin/chromium (`apt-get install -y
chromium`); never `playwright install`. Run with `pytest e2e` (add `--e2e-output DIR` to choose
where screenshots and timings go; default out/e2e/).
"""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import uvicorn

from realm_wasm.cli import default_model_path
from server.static import RequestRecord, StaticSettings, create_app

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")
# WebGPU on SwiftShader without a GPU, and nothing that phones home (see shared ENVIRONMENT.md).
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--enable-unsafe-webgpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--e2e-output", default=str(ROOT / "out" / "e2e"),
                     help="folder for e2e screenshots and measured timings")


@pytest.fixture(scope="session")
def output_dir(request: pytest.FixtureRequest) -> Path:
    path = Path(request.config.getoption("--e2e-output"))
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def site_assets() -> None:
    """Pyodide + numpy in web/vendor/pyodide, the runtime zip in web/dist (both idempotent)."""
    for script in ("vendor_pyodide.py", "build_bundle.py"):
        subprocess.run([sys.executable, str(ROOT / "scripts" / script)], check=True)


@pytest.fixture(scope="session")
def default_model() -> Path:
    return default_model_path()


@pytest.fixture(scope="session")
def extra_models(tmp_path_factory: pytest.TempPathFactory, default_model: Path) -> Path:
    """A model folder of broken files and one tiny valid GGUF written with the gguf package."""
    import gguf

    d = tmp_path_factory.mktemp("extra-models")
    # random bytes, large enough that reading it to the end would show in the server log
    (d / "corrupt.gguf").write_bytes(np.random.default_rng(7).bytes(64 << 20))
    # a real header whose tensor data is cut off
    with default_model.open("rb") as f:
        (d / "truncated.gguf").write_bytes(f.read(16 << 20))
    writer = gguf.GGUFWriter(str(d / "tiny.gguf"), "llama")
    writer.add_name("tiny test model")
    writer.add_tensor("token_embd.weight", np.zeros((8, 32), np.float32))
    writer.add_tensor("output_norm.weight", np.ones(32, np.float32))
    writer.add_tensor("output.weight", np.zeros((8, 32), np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return d


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


@pytest.fixture(scope="session")
def server(site_assets: None, default_model: Path, extra_models: Path) -> Iterator[LiveServer]:
    """The static app on a real uvicorn at 127.0.0.1 (a port the OS picks), in a thread."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    live = LiveServer(url=f"http://127.0.0.1:{sock.getsockname()[1]}/")
    settings = StaticSettings(model_dirs=(default_model.parent, extra_models), default_model=default_model.name,
                              on_request=live.log)
    uv = uvicorn.Server(uvicorn.Config(create_app(settings), log_level="warning", access_log=False))
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not uv.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.05)
    yield live
    uv.should_exit = True
    thread.join(timeout=10)
    sock.close()


@pytest.fixture(scope="session")
def playwright():
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} missing: apt-get install -y chromium")
    with sync_api.sync_playwright() as p:
        yield p


@pytest.fixture
def launch(playwright, tmp_path: Path):
    """launch(webgpu=True) -> a Chromium context on a fresh persistent profile (a real Cache API)."""
    contexts = []

    def start(webgpu: bool = True):
        flags = [f for f in CHROMIUM_FLAGS if webgpu or f != "--enable-unsafe-webgpu"]
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path / f"profile-{len(contexts)}"), executable_path=str(CHROMIUM), headless=True,
            args=flags)
        contexts.append(context)
        return context

    yield start
    for context in contexts:
        context.close()


@pytest.fixture
def browser(launch):
    return launch()


@pytest.fixture
def requested() -> list[str]:
    """Every URL the browser asked for (page and worker), filled by the `page` fixture."""
    return []


@pytest.fixture
def page(browser, server: LiveServer, requested: list[str]):
    """The chat page, open; its console output shows up in pytest's report when a test fails."""
    browser.on("request", lambda r: requested.append(r.url))
    page = browser.pages[0] if browser.pages else browser.new_page()
    console: list[str] = []
    page.on("console", lambda m: console.append(f"console.{m.type}: {m.text}"))
    page.on("pageerror", lambda e: console.append(f"pageerror: {e}"))
    page.goto(server.url)
    yield page
    print("\n".join(console))
