"""The page in headless Chromium: Pyodide boot, model download + Cache API, errors, streaming."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import gguf

import realm_wasm

ROOT = Path(__file__).resolve().parent.parent
BOOT_TIMEOUT_MS = 180_000  # a cold Pyodide boot takes 3-10 s on a busy 2-core machine
LOAD_TIMEOUT_MS = 300_000
LOCK_FILE = ROOT / "web" / "vendor" / "pyodide" / "pyodide-lock.json"


def wait_ready(page) -> None:
    page.wait_for_function("['ready', 'failed'].includes(document.body.dataset.runtime)",
                           timeout=BOOT_TIMEOUT_MS)
    assert page.evaluate("document.body.dataset.runtime") == "ready", page.inner_text("#error")


def load(page, url: str | None = None) -> str:
    """Load the selected model (or `url`); returns the page's verdict, 'loaded' or 'failed'."""
    if url is not None:
        page.select_option("#model-select", "custom")
        page.fill("#model-url", url)
    page.click("#load")
    page.wait_for_function("['loaded', 'failed'].includes(document.body.dataset.model)",
                           timeout=LOAD_TIMEOUT_MS)
    return page.evaluate("document.body.dataset.model")


def error_shown(page) -> tuple[str, str]:
    assert page.is_visible("#error")
    return page.get_attribute("#error", "data-code"), page.inner_text("#error")


def model_facts(page) -> dict[str, str]:
    info = page.locator("#model-info")
    return {key: info.get_attribute(f"data-{key}") for key in ("architecture", "tensor-count", "from-cache")}


def test_worker_boots_pyodide_offline_and_imports_the_runtime(page, server, requested: list[str],
                                                              output_dir: Path) -> None:
    wait_ready(page)

    lock = json.loads(LOCK_FILE.read_text())
    versions = page.inner_text("#runtime-versions")
    assert f"realm_wasm {realm_wasm.__version__}" in versions
    assert f"Python {lock['info']['python']}" in versions
    assert f"numpy {lock['packages']['numpy']['version']}" in versions
    assert f"Pyodide {lock['info']['version']}" in versions
    assert page.evaluate("document.body.dataset.realmVersion") == realm_wasm.__version__

    # offline: everything came from our server, and the numpy wheel and the bundle were among it
    assert f"{server.url}pyodide/pyodide.asm.wasm" in requested  # the worker's requests are seen too
    assert [u for u in requested if not u.startswith((server.url, "data:", "blob:"))] == []
    wheel = f"/pyodide/{lock['packages']['numpy']['file_name']}"
    assert any(r.status == 200 for r in server.requests(wheel))
    assert any(r.status in (200, 304) for r in server.requests("/dist/realm_wasm.zip"))

    # the bundle keeps the repository layout, so the runtime finds its shaders inside Pyodide too
    shaders = {p.name: p.read_text() for p in sorted((ROOT / "shaders").glob("*.wgsl"))}
    assert shaders
    read_in_browser = page.workers[0].evaluate(
        """(names) => {
            const read = self.pyodide.runPython("from realm_wasm.gpu.compose import shader_source; shader_source");
            return names.map((name) => read(name));
        }""", list(shaders))
    assert dict(zip(shaders, read_in_browser, strict=True)) == shaders

    # WebGPU, in the page and in the worker, on the SwiftShader software adapter
    assert page.evaluate("'gpu' in navigator")
    assert page.workers[0].evaluate("'gpu' in navigator")
    assert page.evaluate("document.body.dataset.gpu") == "swiftshader"
    gpu = page.inner_text("#gpu-info")
    assert "swiftshader" in gpu and "software fallback adapter" in gpu

    timings = page.inner_text("#runtime-timings")
    m = re.fullmatch(r"Pyodide (\d+) ms, numpy (\d+) ms, runtime (\d+) ms \(total (\d+) ms\)", timings)
    assert m, timings
    bundle = ROOT / "web" / "dist" / "realm_wasm.zip"
    measured = dict(zip(("pyodide_ms", "numpy_ms", "runtime_ms", "total_ms"), map(int, m.groups()), strict=True))
    measured["bundle_bytes"] = bundle.stat().st_size
    (output_dir / "boot_timings.json").write_text(json.dumps(measured, indent=1) + "\n")
    print("boot:", measured)
    page.screenshot(path=str(output_dir / "boot.png"), full_page=True)


def test_default_model_header_loads_and_a_reload_reads_it_from_the_cache(
        page, server, default_model: Path, output_dir: Path) -> None:
    reader = gguf.GGUFReader(default_model)
    expected = {"architecture": reader.get_field("general.architecture").contents(),
                "tensor-count": str(len(reader.tensors))}
    path = f"/models/{default_model.name}"
    before = len(server.requests(path))
    wait_ready(page)
    assert page.input_value("#model-select") == path

    started = time.monotonic()
    assert load(page) == "loaded", page.inner_text("#error")
    download_s = time.monotonic() - started
    assert model_facts(page) == {**expected, "from-cache": "false"}
    text = page.inner_text("#model-info")
    assert f"architecture {expected['architecture']}, {expected['tensor-count']} tensors" in text
    assert "100.0%" in page.inner_text("#progress-text")
    downloads = server.requests(path)[before:]
    assert [(r.status, r.body_bytes) for r in downloads] == [(200, default_model.stat().st_size)]
    page.screenshot(path=str(output_dir / "model-header.png"), full_page=True)

    page.reload()
    wait_ready(page)
    assert page.inner_text("#cache-info").startswith("1 cached model")
    started = time.monotonic()
    assert load(page) == "loaded", page.inner_text("#error")
    cached_s = time.monotonic() - started
    assert model_facts(page) == {**expected, "from-cache": "true"}
    assert page.inner_text("#progress-text").startswith("from browser cache")
    assert len(server.requests(path)[before:]) == 1, "the reload downloaded the model again"
    print(f"model header: network {download_s:.1f} s, cache {cached_s:.1f} s")


def test_broken_models_show_clear_errors_and_the_page_stays_usable(
        page, server, extra_models: Path, default_model: Path, output_dir: Path) -> None:
    wait_ready(page)

    assert load(page, "/models/corrupt.gguf") == "failed"
    code, text = error_shown(page)
    assert code == "bad-model"
    assert "This is not a usable model file." in text and "not a GGUF file" in text
    page.screenshot(path=str(output_dir / "bad-model.png"), full_page=True)
    # the download was abandoned at the first chunk, not read to the end
    size = (extra_models / "corrupt.gguf").stat().st_size
    deadline = time.monotonic() + 20
    while not server.requests("/models/corrupt.gguf") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert [r.body_bytes < size // 2 for r in server.requests("/models/corrupt.gguf")] == [True]

    assert load(page, "/models/truncated.gguf") == "failed"
    code, text = error_shown(page)
    assert code == "bad-model" and "truncated" in text

    assert load(page, "/models/missing.gguf") == "failed"
    code, text = error_shown(page)
    assert code == "network" and "404" in text

    page.wait_for_function("document.getElementById('cache-info').textContent.startsWith('0 cached')")

    assert load(page, "/models/tiny.gguf") == "loaded", page.inner_text("#error")
    assert not page.is_visible("#error")
    assert model_facts(page) == {"architecture": "llama", "tensor-count": "3", "from-cache": "false"}
    page.wait_for_function("document.getElementById('cache-info').textContent.startsWith('1 cached')")

    page.click("#generate")
    page.wait_for_selector("#error[data-code='no-engine']")
    assert "Generation is not available." in page.inner_text("#error")
    assert not page.is_disabled("#load")

    page.select_option("#model-select", f"/models/{default_model.name}")
    page.click("#load")
    page.click("#stop")
    page.wait_for_function("document.body.dataset.model === 'none'")
    assert page.inner_text("#progress-text") == "loading stopped"
    assert not page.is_disabled("#load")
    assert page.inner_text("#cache-info").startswith("1 cached")  # tiny only: a stopped download is not kept

    page.click("#clear-cache")
    page.wait_for_function("document.getElementById('cache-info').textContent.startsWith('0 cached')")


# Stands in for the engine (not yet wired into the browser) to drive the streaming protocol:
# fixed tokens, a few milliseconds each, recording what it was asked for.
SCRIPTED_ENGINE = """
import time
import realm_web_host as web_host

class Event:
    def __init__(self, token_id, text):
        self.token_id, self.text = token_id, text

class ScriptedEngine:
    calls = []

    def generate(self, prompt, max_tokens, sampling):
        self.calls.append([prompt, max_tokens, sampling.temperature, sampling.top_k, sampling.top_p,
                           sampling.seed])
        for i in range(max_tokens):
            until = time.perf_counter() + 0.005
            while time.perf_counter() < until:
                pass
            yield Event(1000 + i, f" w{i}")

loaded = web_host.HOST.loaded
web_host.HOST.loaded = web_host.LoadedModel(loaded.header, loaded.size, ScriptedEngine())
"""


def test_generation_streams_tokens_with_stats_and_stops(page, server) -> None:
    wait_ready(page)
    assert load(page, "/models/tiny.gguf") == "loaded", page.inner_text("#error")
    worker = page.workers[0]
    worker.evaluate("(code) => { self.pyodide.runPython(code); }", SCRIPTED_ENGINE)

    prompt = "Once upon a time"
    page.fill("#prompt", prompt)
    for field, value in (("max-tokens", "5"), ("temperature", "0.7"), ("top-k", "12"), ("top-p", "0.9"),
                         ("seed", "42")):
        page.fill(f"#{field}", value)
    page.click("#generate")
    page.wait_for_function("document.body.dataset.generation === 'finished'")
    assert page.inner_text("#output") == prompt + " w0 w1 w2 w3 w4"
    assert re.fullmatch(r"TTFT \d+ ms · \d+\.\d tok/s · 5 tokens", page.inner_text("#stats"))
    calls = worker.evaluate("() => self.pyodide.runPython('ScriptedEngine.calls').toJs()")
    assert calls == [[prompt, 5, 0.7, 12, 0.9, 42]]

    page.fill("#max-tokens", "4000")
    page.click("#generate")
    page.wait_for_function("document.getElementById('output').textContent.includes(' w3')")
    page.click("#stop")
    page.wait_for_function("document.body.dataset.generation === 'stopped'")
    tokens = int(re.search(r"(\d+) tokens", page.inner_text("#stats")).group(1))
    assert 4 <= tokens < 4000
    assert page.inner_text("#output").endswith(f" w{tokens - 1}")
    assert not page.is_disabled("#generate")


FAILING_ENGINE = """
import realm_web_host as web_host
from realm_wasm.gpu.device import DeviceLost

class FailingEngine:
    def __init__(self, error):
        self.error = error

    def generate(self, prompt, max_tokens, sampling):
        raise self.error

def fail_with(error):
    loaded = web_host.HOST.loaded
    web_host.HOST.loaded = web_host.LoadedModel(loaded.header, loaded.size, FailingEngine(error))
"""


def test_runtime_failures_get_their_own_messages(page, server) -> None:
    wait_ready(page)
    assert load(page, "/models/tiny.gguf") == "loaded", page.inner_text("#error")
    worker = page.workers[0]
    worker.evaluate("(code) => { self.pyodide.runPython(code); }", FAILING_ENGINE)
    for raise_, code, title in (
        ("DeviceLost('the adapter was reset')", "device-lost", "The GPU device was lost."),
        ("MemoryError('cannot allocate the KV cache')", "out-of-memory", "Out of memory."),
    ):
        worker.evaluate("(code) => { self.pyodide.runPython(code); }", f"fail_with({raise_})")
        page.click("#generate")
        page.wait_for_selector(f"#error[data-code='{code}']")
        text = page.inner_text("#error")
        assert title in text and raise_.split("'")[1] in text
        assert page.evaluate("document.body.dataset.generation") == "failed"
        page.wait_for_function("!document.getElementById('generate').disabled")


def test_without_webgpu_the_page_says_so(launch, server) -> None:
    page = launch(webgpu=False).pages[0]
    page.goto(server.url)
    wait_ready(page)
    assert page.evaluate("document.body.dataset.gpu") == "none"
    code, text = error_shown(page)
    assert code == "no-webgpu"
    assert "WebGPU is not available." in text
    assert page.inner_text("#gpu-info").startswith("unavailable:")
    assert not page.is_disabled("#load")  # reading models does not need the GPU
