"""The page over a long session, in headless Chromium on WebGPU (SwiftShader): 100 generations in a
row leave the wasm heap and the GPU buffers where they were, and a lost GPU device (destroyed from
the worker in the middle of a generation) is replaced by the page itself: a new device, the model
and its LoRA adapter loaded again from the cache, a message, and the next generation as before.

The model is test_scheduler's tiny random llama (2 layers, 96 tokens of vocabulary): on SwiftShader
a generation of a few tokens takes tens of milliseconds, so 100 of them fit in seconds (~8 s here).
Loading it is what costs: 40-60 s on a busy 2-core machine, nearly all of it the GPU process
compiling the 29 kernels for a new device on SwiftShader (the load's `settle`), so both tests share
one page and the device is lost once: the module takes 45 s on a quiet machine, ~100 s on a busy one.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from harness import (
    CHROMIUM,
    LOAD_TIMEOUT_MS,
    ROOT,
    LiveServer,
    chromium_flags,
    generate,
    in_worker,
    live_server,
    load,
    load_adapter,
    wait_ready,
)

sys.path.insert(0, str(ROOT / "tests"))  # test_lora's own imports (golden, test_llama, ...)
import test_lora  # noqa: E402
import test_scheduler  # noqa: E402

from realm_wasm.gguf import read_gguf  # noqa: E402
from realm_wasm.lora import adaptable_weights  # noqa: E402
from realm_wasm.models import build_plan  # noqa: E402

MODEL = "/models/tiny.gguf"
ADAPTER = "/models/tiny-lora.gguf"  # rank 4 on every projection: it changes the greedy tokens
PROMPT = "Once upon a time"
WARM_UP, GENERATIONS = 5, 100

# 100 generations from the page's own button, in the page: each waits for the one before to finish
RUN_GENERATIONS = """async (n) => {
    const button = document.getElementById("generate");
    const ended = () => ["finished", "stopped", "failed"].includes(document.body.dataset.generation);
    const settle = () => new Promise((resolve) => setTimeout(resolve, 1));
    for (let i = 0; i < n; i++) {
        while (button.disabled) await settle();
        document.body.dataset.generation = "";
        button.click();
        while (!ended()) await settle();
        if (document.body.dataset.generation !== "finished") return i;
    }
    return n;
}"""
# what the worker's "stats" message reports (web/worker.js): the wasm heap, and the model device's buffers
MEMORY = """() => ({heap: self.pyodide._module.HEAPU8.byteLength, ...JSON.parse(self.pyodide.runPython(
    "import json; from realm_web_host import HOST; s = HOST.stats(); json.dumps({'buffers': s['gpuBuffers'], "
    + "'bytes': s['gpuBytes']})"))})"""
DESTROY_DEVICE = """() => self.pyodide.runPython(
    "from realm_web_host import HOST; HOST.loaded.device.device").destroy()"""


@pytest.fixture(scope="module")
def tiny_server(site_assets: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    folder = tmp_path_factory.mktemp("tiny-model")
    test_scheduler.write_tiny_model(folder / "tiny.gguf")
    plan = build_plan(read_gguf(folder / "tiny.gguf").header)
    test_lora.make_adapter(folder / "tiny-lora.gguf", plan, adaptable_weights(plan), 4, np.random.default_rng(5),
                           alpha=8.0)
    with live_server((folder,), "tiny") as live:
        yield live


@pytest.fixture(scope="module")
def tiny_page(playwright, tiny_server: LiveServer, tmp_path_factory: pytest.TempPathFactory):
    """The page with the tiny model loaded on WebGPU, for this module's tests in turn."""
    browser = playwright.chromium.launch_persistent_context(
        str(tmp_path_factory.mktemp("profile")), executable_path=str(CHROMIUM), headless=True, args=chromium_flags())
    page = browser.pages[0] if browser.pages else browser.new_page()
    console: list[str] = []
    page.on("console", lambda m: console.append(f"console.{m.type}: {m.text}"))
    try:
        page.goto(tiny_server.url + "?backend=webgpu")
        wait_ready(page)
        assert load(page, MODEL) == "loaded", page.inner_text("#error")
        assert page.get_attribute("#model-info", "data-backend") == "webgpu"
        page.fill("#prompt", PROMPT)
        yield page
    finally:
        print("\n".join(console))
        browser.close()


def memory(page) -> dict:
    return page.workers[0].evaluate(MEMORY)


def test_100_generations_leave_wasm_heap_and_gpu_memory_flat(tiny_page, output_dir: Path) -> None:
    page = tiny_page
    expected = generate(page, 3)
    assert len(expected) == 3
    assert page.evaluate(RUN_GENERATIONS, WARM_UP) == WARM_UP
    base = memory(page)
    assert base["buffers"] > 0 and base["bytes"] > 0  # the model's weights, KV cache, scratch on the device
    samples = []
    for _ in range(GENERATIONS // 10):
        assert page.evaluate(RUN_GENERATIONS, 10) == 10, page.inner_text("#error")
        samples.append(memory(page))
    assert [int(i) for i in page.get_attribute("#output", "data-token-ids").split(",")] == expected  # still greedy
    (output_dir / "endurance.json").write_text(json.dumps({"base": base, "every_10": samples}, indent=1) + "\n")
    print("memory after warm-up", base, "then every 10 generations", samples)
    for key in ("heap", "buffers", "bytes"):
        assert all(abs(s[key] - base[key]) <= 0.05 * base[key] for s in samples), (key, base, samples)


def test_a_lost_gpu_device_is_replaced_and_the_model_loaded_again(tiny_page) -> None:
    page = tiny_page
    expected = generate(page, 4)
    assert load_adapter(page, ADAPTER) == "loaded", page.inner_text("#error")
    switch = page.locator("#adapter-list li[data-adapter-id='tiny-lora'] .adapter-on")
    with_adapter = generate(page, 4)  # switched on as it loads
    assert with_adapter != expected
    switch.uncheck()  # off while the device is lost (with it, this model ends its text too soon)
    device = in_worker(page, "from realm_web_host import HOST; id(HOST.loaded.device)")

    # lost in the middle of a generation: that one fails with its own message ...
    page.fill("#max-tokens", "60")  # the prompt and 60 tokens fit the 96 of its context
    page.click("#generate")
    page.wait_for_function("document.getElementById('output').dataset.tokenIds !== ''")
    page.workers[0].evaluate(DESTROY_DEVICE)
    page.wait_for_function("['finished', 'failed'].includes(document.body.dataset.generation)")
    assert page.evaluate("document.body.dataset.generation") == "failed"
    assert page.get_attribute("#error", "data-code") == "device-lost"
    assert "The GPU device was lost." in page.inner_text("#error")
    # ... the page says what it does about it, makes a new device and loads the model again by itself
    assert page.get_attribute("#warning", "data-code") == "device-lost"
    page.wait_for_function("document.getElementById('warning').textContent.includes('loaded again')"
                           " && document.body.dataset.model === 'loaded'", timeout=LOAD_TIMEOUT_MS)
    assert "with its adapters (tiny-lora)" in page.inner_text("#warning")
    assert page.inner_text("#warning").startswith("The GPU device was lost (")  # and why, as WebGPU said it
    assert in_worker(page, "from realm_web_host import HOST; id(HOST.loaded.device)") != device
    assert in_worker(page, "from realm_web_host import HOST; HOST.loaded.device.lost is None")
    assert page.get_attribute("#model-info", "data-from-cache") == "true"  # not downloaded again
    # and the next generation is the one before the loss; the adapter is back, switched as it was
    assert generate(page, 4) == expected
    assert not switch.is_checked()
    switch.check()
    assert generate(page, 4) == with_adapter
