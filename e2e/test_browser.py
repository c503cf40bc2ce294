"""The page in headless Chromium: Pyodide boot, the base model (gemma-3-270m, completion mode)
generating on WebGPU (SwiftShader) and on the numpy fallback, the browser cache, errors, stopping.
The chat model and the chat page: test_chat.py."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

from harness import GENERATE_TIMEOUT_MS, ROOT, generate, generation_stats, in_worker, load, token_ids, wait_ready

import realm_wasm
from realm_wasm.engine import Engine
from realm_wasm.sampling import SamplingParams

LOCK_FILE = ROOT / "web" / "vendor" / "pyodide" / "pyodide-lock.json"
# the prompt part is missing when a generation was stopped
STATS = re.compile(r"TTFT \d+ ms( · \d+\.\d tok/s)? · (\d+) tokens"
                   r"( · prompt \d+ tokens, \d+ reused from the KV cache)?")


def error_shown(page) -> tuple[str, str]:
    assert page.is_visible("#error")
    return page.get_attribute("#error", "data-code"), page.inner_text("#error")


def model_facts(page) -> dict[str, str]:
    info = page.locator("#model-info")
    return {key: info.get_attribute(f"data-{key}") for key in ("architecture", "tensor-count", "from-cache", "backend")}


def record(output_dir: Path, name: str, **measured) -> None:
    """Keep what a test measured in output_dir/browser_timings.json (merged across tests)."""
    path = output_dir / "browser_timings.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    data[name] = measured
    path.write_text(json.dumps(data, indent=1) + "\n")
    print(name, measured)


def stats(page) -> dict[str, float | None]:
    """The numbers of the last generation, which the page also shows in words."""
    measured = generation_stats(page)
    m = STATS.fullmatch(page.inner_text("#stats"))
    assert m and int(m.group(2)) == measured["tokens"], page.inner_text("#stats")
    return measured


def test_worker_boots_pyodide_offline_and_imports_the_runtime(page, server, requested: list[str],
                                                              output_dir: Path) -> None:
    wait_ready(page)

    lock = json.loads(LOCK_FILE.read_text())
    versions = page.text_content("#runtime-versions")
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
    # jinja2 + markupsafe for the chat templates, from our vendored wheels
    assert any(r.status == 200 for r in server.requests("/pyodide/jinja2-3.1.6-py3-none-any.whl"))
    assert any(r.status == 200 for r in server.requests("/pyodide/markupsafe-3.0.3-py3-none-any.whl"))
    assert in_worker(page, "import jinja2, markupsafe; jinja2.__version__ + ' ' + markupsafe.__version__") \
        == "3.1.6 3.0.3"
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
    gpu = page.text_content("#gpu-info")
    assert "swiftshader" in gpu and "software fallback adapter" in gpu

    timings = page.text_content("#runtime-timings")
    m = re.fullmatch(r"Pyodide (\d+) ms, packages (\d+) ms, runtime (\d+) ms \(total (\d+) ms\)", timings)
    assert m, timings
    bundle = ROOT / "web" / "dist" / "realm_wasm.zip"
    measured = dict(zip(("pyodide_ms", "packages_ms", "runtime_ms", "total_ms"), map(int, m.groups()), strict=True))
    measured["bundle_bytes"] = bundle.stat().st_size
    (output_dir / "boot_timings.json").write_text(json.dumps(measured, indent=1) + "\n")
    print("boot:", measured)
    page.screenshot(path=str(output_dir / "boot.png"), full_page=True)


def test_paris_on_webgpu_with_the_weights_streamed_past_the_wasm_heap(
        open_page, server, default_model: Path, paris: dict, output_dir: Path) -> None:
    page = open_page("?backend=webgpu")  # the page would pick numpy on SwiftShader by itself
    wait_ready(page)
    assert page.input_value("#backend") == "webgpu"

    started = time.monotonic()
    assert load(page, f"/models/{default_model.name}") == "loaded", page.inner_text("#error")
    load_s = time.monotonic() - started
    assert model_facts(page)["backend"] == "webgpu"
    assert page.evaluate("document.body.dataset.mode") == "completion"  # a base model: no chat template
    assert "WebGPU on google swiftshader" in page.inner_text("#backend-info")
    # the tensors went from the download stream to GPU buffers, never all into the wasm heap
    heap = int(page.get_attribute("#model-info", "data-wasm-heap-bytes"))
    assert heap < default_model.stat().st_size // 2, f"wasm heap {heap} bytes after a WebGPU load"

    ids = generate(page, 2)
    assert page.inner_text("#answer").startswith(" Paris")
    assert ids == paris["greedy_ids"][:2]
    assert page.inner_text("#output") == paris["prompt"] + page.inner_text("#answer")
    page.screenshot(path=str(output_dir / "chat-webgpu.png"), full_page=True)
    record(output_dir, "webgpu_swiftshader", load_s=round(load_s, 1), wasm_heap_bytes=heap, **stats(page))


# Count the loaded executor's submits, and how many of its read-backs were still open when one was
# read: more than one means the page had queued steps behind the one it was reading.
COUNT_READS = """
from realm_web_host import HOST
executor = HOST.loaded.engine.executor
READS = {"submits": 0, "open": 0, "open_at_read": []}

class CountedRead:
    def __init__(self, back):
        self.back = back
        READS["open"] += 1

    def result(self):
        READS["open_at_read"].append(READS["open"])
        READS["open"] -= 1
        return self.back.result()

def counted_submit(*args, _submit=type(executor.device).submit.__get__(executor.device), **kwargs):
    READS["submits"] += 1
    back = _submit(*args, **kwargs)
    return None if back is None else CountedRead(back)

executor.device.submit = counted_submit
"""


def test_decoding_ahead_leaves_the_greedy_ids_as_they_are(open_page, server, default_model: Path,
                                                          paris: dict) -> None:
    """The page queues decode steps behind the one it reads and runs several a submit (its device's
    run_ahead and steps_per_submit); waiting for every step instead gives the same ids."""
    page = open_page("?backend=webgpu")
    wait_ready(page)
    assert load(page, f"/models/{default_model.name}") == "loaded", page.inner_text("#error")
    in_worker(page, COUNT_READS)
    tokens = 9
    ahead = generate(page, tokens)
    counted = json.loads(in_worker(page, "import json; json.dumps(READS)"))
    assert counted["submits"] < tokens and max(counted["open_at_read"]) > 1, counted
    in_worker(page, "executor.run_ahead, executor.steps_per_submit = 0, 1; "
                    "READS.update(submits=0, open=0, open_at_read=[])")
    waiting = generate(page, tokens)
    counted = json.loads(in_worker(page, "json.dumps(READS)"))
    assert counted["submits"] == tokens and set(counted["open_at_read"]) == {1}, counted
    assert ahead == waiting
    assert ahead[:2] == paris["greedy_ids"][:2]


# Raise what WebGPU would report, on the loaded model's real GPUDevice.
DISPATCH_GPU_ERROR = """([kind, message]) => {
    const device = self.pyodide.runPython("from realm_web_host import HOST; HOST.loaded.device.device");
    device.dispatchEvent(new GPUUncapturedErrorEvent("uncapturederror", {error: new self[kind](message)}));
}"""


def test_webgpu_errors_get_their_own_messages(open_page, server, default_model: Path) -> None:
    """(A lost device, which the page replaces by itself: e2e/test_endurance.py.)"""
    gemma = f"/models/{default_model.name}"
    page = open_page("?backend=webgpu")
    wait_ready(page)
    assert load(page, gemma) == "loaded", page.inner_text("#error")
    worker = page.workers[0]
    for kind, code, title in (("GPUOutOfMemoryError", "out-of-memory", "Out of memory."),
                              ("GPUValidationError", "gpu", "WebGPU reported an error.")):
        worker.evaluate(DISPATCH_GPU_ERROR, [kind, f"synthetic {kind}"])
        page.click("#generate")
        page.wait_for_selector(f"#error[data-code='{code}']")
        assert title in page.inner_text("#error") and f"synthetic {kind}" in page.inner_text("#error")
        assert page.evaluate("document.body.dataset.generation") == "failed"
        page.wait_for_function("!document.getElementById('generate').disabled")


def test_paris_without_webgpu_runs_on_numpy_and_stops_when_asked(
        open_page, server, default_model: Path, paris: dict, output_dir: Path) -> None:
    gemma = f"/models/{default_model.name}"
    page = open_page("?backend=webgpu", webgpu=False)
    wait_ready(page)
    assert page.evaluate("document.body.dataset.gpu") == "none"
    assert page.text_content("#gpu-info").startswith("unavailable:")
    assert page.get_attribute("#warning", "data-code") == "no-webgpu"
    assert "WebGPU is not available" in page.inner_text("#warning")

    # asking for WebGPU where there is none is a clear error; automatic falls back to numpy
    assert load(page, gemma) == "failed"
    code, text = error_shown(page)
    assert code == "no-webgpu" and "WebGPU is not available." in text
    page.select_option("#backend", "auto")
    started = time.monotonic()
    assert load(page, gemma) == "loaded", page.inner_text("#error")
    load_s = time.monotonic() - started
    assert model_facts(page)["backend"] == "numpy"
    assert page.inner_text("#backend-info").startswith("no WebGPU (")

    ids = generate(page, 4)
    assert page.inner_text("#answer").startswith(" Paris\n")
    assert ids == paris["greedy_ids"][:4]
    record(output_dir, "numpy_no_webgpu", load_s=round(load_s, 1), **stats(page))

    page.fill("#max-tokens", "1000")  # the prompt and 1000 tokens fit the page's 2048-token context
    page.click("#generate")
    page.wait_for_function("document.getElementById('output').dataset.tokenIds.split(',').length >= 2"
                           " || document.body.dataset.generation === 'failed'", timeout=GENERATE_TIMEOUT_MS)
    page.click("#stop")
    page.wait_for_function("document.body.dataset.generation !== 'running'", timeout=GENERATE_TIMEOUT_MS)
    assert page.evaluate("document.body.dataset.generation") == "stopped", page.inner_text("#error")
    ids = token_ids(page)
    assert 2 <= len(ids) < 1000 and ids[:2] == paris["greedy_ids"][:2]
    assert stats(page)["tokens"] == len(ids)
    assert not page.is_disabled("#generate")

    # Q&A style for the base model: a plain question is wrapped as "Question: …\nAnswer:" and the
    # answer ends where the model starts its next "Question:"
    page.select_option("#style", "qa")
    page.fill("#prompt", "What is the capital of France?")
    page.fill("#max-tokens", "12")
    page.click("#generate")
    page.wait_for_function("document.body.dataset.generation !== 'running'", timeout=GENERATE_TIMEOUT_MS)
    assert page.text_content("#output-prompt") == "Question: What is the capital of France?\nAnswer:"
    assert page.text_content("#answer") == " Paris"


def test_auto_uses_numpy_on_swiftshader_and_a_reload_reads_the_model_from_the_cache(
        page, server, default_model: Path, output_dir: Path) -> None:
    path = f"/models/{default_model.name}"
    before = len(server.requests(path))
    wait_ready(page)
    assert page.input_value("#backend") == "auto"
    assert "cached" not in page.locator(f"#model-select option[value='{path}']").inner_text()

    assert load(page, path) == "loaded", page.inner_text("#error")
    assert model_facts(page) == {"architecture": "gemma3", "tensor-count": "236", "from-cache": "false",
                                 "backend": "numpy"}
    assert page.inner_text("#backend-info").startswith(
        "WebGPU adapter is a CPU fallback (google swiftshader): using the numpy executor")
    assert "100.0%" in page.inner_text("#progress-text")
    downloads = server.requests(path)[before:]
    assert [(r.status, r.body_bytes) for r in downloads] == [(200, default_model.stat().st_size)]

    page.reload()
    wait_ready(page)
    assert page.inner_text("#cache-info").startswith("1 cached model")
    # the picker says which models the browser holds
    gemma_option = page.locator(f"#model-select option[value='{path}']").inner_text()
    assert gemma_option.endswith("· base · cached)"), gemma_option
    assert "cached" not in page.locator("#model-select option[value='/models/smollm2-135m-instruct-q4_1.gguf']"
                                        ).inner_text()
    started = time.monotonic()
    assert load(page, path) == "loaded", page.inner_text("#error")
    cached_s = time.monotonic() - started
    assert model_facts(page)["from-cache"] == "true"
    assert page.inner_text("#progress-text").startswith("from browser cache")
    # the reload only asked whether the server's file is still the cached one (web/worker.js)
    assert [(r.method, r.status, r.body_bytes) for r in server.requests(path)[before:]] == [
        ("GET", 200, default_model.stat().st_size), ("HEAD", 200, 0)], "the reload downloaded the model again"

    # sampling settings reach the engine: the same seed draws the same tokens as numpy natively
    sampling = {"temperature": "0.8", "top-k": "12", "top-p": "0.9", "seed": "42"}
    ids = generate(page, 3, "Once upon a time", **sampling)
    engine = Engine.load(default_model, backend="numpy", n_ctx=64)
    native = SamplingParams(temperature=0.8, top_k=12, top_p=0.9, seed=42)
    expected = [e.token_id for e in engine.generate("Once upon a time", 3, native) if e.token_id is not None]
    assert ids == expected
    assert page.inner_text("#answer") == engine.tokenizer.decode(expected)
    page.screenshot(path=str(output_dir / "chat-numpy.png"), full_page=True)
    record(output_dir, "numpy_auto_swiftshader", cached_load_s=round(cached_s, 1), **stats(page))
    # prompt lookup (a generation setting) gives the same tokens, and the stats line counts its drafts
    page.check("#lookup")
    copy = "Copy this list exactly: red, green, blue, yellow. Copy this list exactly: red, green,"
    assert generate(page, 4, copy) == [e.token_id for e in engine.generate(copy, 4) if e.token_id is not None]
    drafted, accepted = map(int, re.search(r"lookup drafted (\d+), accepted (\d+)", page.inner_text("#stats")).groups())
    assert drafted >= accepted and drafted > 0
    page.uncheck("#lookup")

    page.click("#clear-cache")
    page.wait_for_function("document.getElementById('cache-info').textContent.startsWith('0 cached')")


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

    # a well-formed GGUF the runtime cannot run: no tokenizer in its metadata
    assert load(page, "/models/tiny.gguf") == "failed"
    code, text = error_shown(page)
    assert code == "bad-model" and "tokenizer" in text
    assert page.is_disabled("#generate")
    page.wait_for_function("document.getElementById('cache-info').textContent.startsWith('0 cached')")

    page.select_option("#model-select", f"/models/{default_model.name}")
    page.click("#load")
    assert not page.is_visible("#error")
    page.click("#load-stop")
    page.wait_for_function("document.body.dataset.model === 'none'")
    assert page.inner_text("#progress-text") == "loading stopped"
    assert not page.is_disabled("#load")
    page.wait_for_function("document.getElementById('cache-info').textContent.startsWith('0 cached')")
