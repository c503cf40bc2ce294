"""End-to-end fixtures: vendored Pyodide + bundle, a real uvicorn server, headless Chromium.

Needs `pip install playwright` and Debian's chromium at /usr/bin/chromium (`apt-get install -y
chromium`); never `playwright install`. Run with `pytest e2e` (add `--e2e-output DIR` to choose
where screenshots and timings go; default out/e2e/).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from harness import (
    CHROMIUM,
    LORA_ADAPTER,
    ROOT,
    SPLIT_MODEL,
    LiveServer,
    NativeChat,
    build_site_assets,
    chromium_flags,
    live_server,
)

from realm_wasm.model_files import CHAT_MODEL, chat_model_path, default_model_path

# llama.cpp's outputs for the default model (tests/golden.py reads the same folder)
GOLDEN_DIR = Path(os.environ.get("REALM_GOLDEN_DIR") or ROOT.parent / "shared" / "golden") / "gemma-3-270m-q4_k_m"
LORA_GOLDEN_DIR = GOLDEN_DIR.parent / "lora-gemma-3-270m"  # a LoRA adapter for it, and llama.cpp's outputs with it


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
    build_site_assets()


@pytest.fixture(scope="session")
def default_model() -> Path:
    return default_model_path()


@pytest.fixture(scope="session")
def chat_model() -> Path:
    """The bundled SmolLM2-135M-Instruct, the page's default model."""
    return chat_model_path()


@pytest.fixture(scope="session")
def native(chat_model: Path) -> NativeChat:
    """The chat model on numpy natively: what the page must answer, token for token."""
    return NativeChat(chat_model)


@pytest.fixture(scope="session")
def chat_golden() -> dict:
    """llama.cpp on QUESTION, in the chat model's template (its default system prompt): prompt and
    greedy ids. The page's numpy kernel rounds as llama.cpp does, so this is what it must answer."""
    return json.loads((GOLDEN_DIR.parent / "smollm2-135m-instruct-q4_1" / "chat_colors.json").read_text())


@pytest.fixture(scope="session")
def paris() -> dict:
    """llama.cpp on "Question: What is the capital of France?\nAnswer:": prompt ids, greedy ids."""
    return json.loads((GOLDEN_DIR / "qa_paris.json").read_text())


def write_split(source: Path, folder: Path, n: int, name: str) -> Path:
    """tests/gguf_split.py's: a GGUF file as gguf-split's shards (that folder is not importable here)."""
    spec = importlib.util.spec_from_file_location("gguf_split", ROOT / "tests" / "gguf_split.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.write_split(source, folder, n, name)


@pytest.fixture(scope="session")
def extra_models(tmp_path_factory: pytest.TempPathFactory, default_model: Path, chat_model: Path) -> Path:
    """A model folder of broken files, a tiny well-formed GGUF (written with the gguf package)
    that cannot run (it has no tokenizer), the golden LoRA adapter for the default model, the chat
    model split in three as gguf-split splits (SPLIT_MODEL), and the first shard of a split model
    whose other shards are missing (gone-00001-of-00003.gguf)."""
    import gguf

    d = tmp_path_factory.mktemp("extra-models")
    first = write_split(chat_model, d, 3, SPLIT_MODEL.removesuffix("-00001-of-00003.gguf"))
    shutil.copyfile(first, d / "gone-00001-of-00003.gguf")
    # random bytes, large enough that reading it to the end would show in the server log
    (d / "corrupt.gguf").write_bytes(np.random.default_rng(7).bytes(64 << 20))
    shutil.copyfile(LORA_GOLDEN_DIR / "adapter.gguf", d / LORA_ADAPTER)
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


@pytest.fixture(scope="session")
def server(site_assets: None, default_model: Path, chat_model: Path, extra_models: Path) -> Iterator[LiveServer]:
    """The page with both bundled models (the chat model preselected) and the broken ones; the
    split model without its other shards comes at 4 MB/s (test_split.py: named before it is whole)."""
    dirs = tuple(dict.fromkeys((chat_model.parent, default_model.parent, extra_models)))
    with live_server(dirs, CHAT_MODEL, rates={"/models/gone-00001-of-00003.gguf": 4e6}) as live:
        yield live


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
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path / f"profile-{len(contexts)}"), executable_path=str(CHROMIUM), headless=True,
            args=chromium_flags(webgpu))
        contexts.append(context)
        return context

    yield start
    for context in contexts:
        context.close()


@pytest.fixture
def requested() -> list[str]:
    """Every URL the browser asked for (page and worker), filled by the `page` fixture."""
    return []


@pytest.fixture
def open_page(launch, server: LiveServer, requested: list[str]):
    """open_page(query="", webgpu=True) -> the chat page at `server.url + query` in a fresh browser;
    its console output shows up in pytest's report when a test fails."""
    console: list[str] = []

    def start(query: str = "", webgpu: bool = True):
        browser = launch(webgpu)
        browser.on("request", lambda r: requested.append(r.url))
        page = browser.pages[0] if browser.pages else browser.new_page()
        page.on("console", lambda m: console.append(f"console.{m.type}: {m.text}"))
        page.on("pageerror", lambda e: console.append(f"pageerror: {e}"))
        page.goto(server.url + query)
        return page

    yield start
    print("\n".join(console))


@pytest.fixture
def page(open_page):
    """The chat page with its defaults, open."""
    return open_page()
