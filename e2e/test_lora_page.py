"""A LoRA adapter in the page: loaded from its URL, applied to a generation, switched off, held to
llama.cpp's outputs with and without it (../shared/golden/lora-gemma-3-270m), on the numpy
executor with its SIMD kernel (which rounds activations to 8 bits as llama.cpp does)."""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from pathlib import Path

from harness import LORA_ADAPTER, ROOT, generate, load, load_adapter, wait_ready

# tests/golden.py: where llama.cpp's outputs are, and the margin below which they do not judge
_spec = importlib.util.spec_from_file_location("golden", ROOT / "tests" / "golden.py")
golden = sys.modules["golden"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(golden)

GOLDEN = json.loads((golden.LORA_GOLDEN_DIR / "golden.json").read_text())
CASE = "count"  # "1, 2, 3, 4, 5,": without the adapter llama.cpp's top-1 leads by > 2.7 at every step
STEPS = 8


def disagreements(got: list[int], case: dict) -> list[int]:
    """Steps where llama.cpp's top-1 beat its top-2 by MIN_MARGIN and the page's token differs, up
    to the first step where they part (llama.cpp's margin small there: both are right; the texts
    read on differ, so no later step compares)."""
    bad = []
    for step, (ours, theirs, margin) in enumerate(zip(got, case["greedy_ids"], case["margins"], strict=False)):
        if margin >= golden.MIN_MARGIN and ours != theirs:
            bad.append(step)
        if ours != theirs:
            break
    return bad


def test_a_lora_adapter_loaded_from_a_url_applies_until_switched_off(
        open_page, server, default_model: Path) -> None:
    model_url = f"/models/{default_model.name}"
    earlier = len(server.requests(model_url))  # the server is shared: other tests' loads are logged too
    page = open_page("?backend=numpy")
    wait_ready(page)
    assert load(page, model_url) == "loaded", page.inner_text("#error")

    # a model is not an adapter: refused from its header, with its code, the download abandoned there
    assert load_adapter(page, model_url) == "failed"
    assert page.get_attribute("#error", "data-code") == "bad-adapter"
    assert "general.type is 'model'" in page.inner_text("#error-message")
    assert page.locator("#adapter-list li").count() == 0
    deadline = time.monotonic() + 20
    while len(server.requests(model_url)) < earlier + 2 and time.monotonic() < deadline:  # the model's, this one
        time.sleep(0.1)
    ours = server.requests(model_url)[earlier:]  # logged as each response ends: in either order
    assert len(ours) == 2 and min(r.body_bytes for r in ours) < default_model.stat().st_size // 2

    assert load_adapter(page, f"/models/{LORA_ADAPTER}") == "loaded", page.inner_text("#error")
    name = LORA_ADAPTER.removesuffix(".gguf")
    switch = page.locator(f"#adapter-list li[data-adapter-id='{name}'] .adapter-on")
    assert switch.is_checked()
    base, lora = GOLDEN["runs"]["base"][CASE], GOLDEN["runs"]["lora_1.0"][CASE]

    # measured: the page's first 4 tokens are llama.cpp's, and it parts at step 4, where llama.cpp's
    # top two are 0.07 apart. The native float32 engine parts at step 1 already (0.87 apart): rounding
    # as llama.cpp does, the page is closer to llama.cpp than to it, so llama.cpp is the oracle.
    with_adapter = generate(page, STEPS, lora["prompt"])
    assert with_adapter != base["greedy_ids"][:STEPS]  # a step where the base model leads by > 2.7
    assert not disagreements(with_adapter, lora), f"{with_adapter} vs llama.cpp's {lora['greedy_ids'][:STEPS]}"

    switch.uncheck()
    assert generate(page, STEPS, base["prompt"]) == base["greedy_ids"][:STEPS]

    page.click(f"#adapter-list li[data-adapter-id='{name}'] .adapter-unload")
    page.wait_for_function("document.body.dataset.adapter === 'unloaded'")
    assert page.locator("#adapter-list li").count() == 0
