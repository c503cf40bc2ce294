"""The page's numpy executor multiplying with its WebAssembly SIMD kernel (realm_wasm/wasm_kernels.py):
the kernel is in use, the weights stay in their GGUF bytes, and the answers are llama.cpp's."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
from harness import ROOT, generate, in_worker, load, wait_ready

# tests/golden.py: llama.cpp's reference for the default model, and how to judge against it
_spec = importlib.util.spec_from_file_location("golden", ROOT / "tests" / "golden.py")
golden = sys.modules["golden"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(golden)

# Teacher-forced logits of the page's engine, for each case: the argmax at every position and the
# logits of the reference's top-20 ids there (the whole rows would be 1 MB a position).
FORCED_LOGITS = """
import json
import numpy as np
from realm_web_host import HOST
out = {}
for name, ids, ref_ids in json.loads(CASES):
    logits = np.concatenate(list(HOST.loaded.engine.prefill(ids, all_logits=True)))
    out[name] = {"argmax": logits.argmax(axis=1).tolist(),
                 "at_ref": [row[r].tolist() for row, r in zip(logits, ref_ids)]}
json.dumps(out)
"""


# What the executor does with each weight: which kernel, the types it multiplies in place, and the
# dtypes of the weights held as arrays
KEPT_WEIGHTS = """
import json
from realm_web_host import HOST
from realm_wasm.cpu import QuantizedWeight
ex = HOST.loaded.engine.executor
in_place = {w.t.type_name for w in ex.w.values() if isinstance(w, QuantizedWeight) and w.kernel is ex.kernel}
arrays = {str(w.dtype) for w in ex.w.values() if not isinstance(w, QuantizedWeight)}
json.dumps([type(ex.kernel).__name__, sorted(in_place), sorted(arrays)])
"""


def test_numpy_in_the_page_multiplies_the_quantized_weights_in_place(
        open_page, server, default_model: Path, paris: dict) -> None:
    page = open_page("?backend=numpy")
    wait_ready(page)
    assert load(page, f"/models/{default_model.name}") == "loaded", page.inner_text("#error")
    # every matrix of the model is of a type the kernel takes: none was dequantized
    kept = json.loads(in_worker(page, KEPT_WEIGHTS))
    assert kept == ["WasmMatmul", ["Q4_K", "Q5_0", "Q6_K", "Q8_0"], ["float32"]]
    # the heap holds the file and the activations, not float32 copies of the weights (776 MB before)
    heap = int(page.get_attribute("#model-info", "data-wasm-heap-bytes"))
    assert heap < 2 * default_model.stat().st_size, f"wasm heap {heap} bytes"

    ids = generate(page, 8, paris["prompt"])
    assert page.inner_text("#answer").startswith(" Paris")
    assert ids == paris["greedy_ids"][:8]


def test_numpy_in_the_page_agrees_with_llama_cpp_on_the_golden_prompts(
        open_page, server, default_model: Path) -> None:
    page = open_page("?backend=numpy")
    wait_ready(page)
    assert load(page, f"/models/{default_model.name}") == "loaded", page.inner_text("#error")
    # the short prompts (the 874-token one adds minutes of prefill and nothing the kernel does
    # differently: tests/test_golden.py runs it on the same executor natively)
    cases = [c for c in golden.load_cases() if len(c.token_ids) < 100]
    payload = [[c.name, c.forced_ids, [[t for t, _ in ref] for ref in c.ref_top20]] for c in cases]
    got = json.loads(in_worker(page, f"CASES = {json.dumps(payload)!r}\n{FORCED_LOGITS}"))

    deltas = []
    for case in cases:
        argmax, at_ref = got[case.name]["argmax"], np.array(got[case.name]["at_ref"])
        bad = [i for i, ref in enumerate(case.ref_top20)
               if case.margin(i) >= golden.MIN_MARGIN and argmax[i] != ref[0][0]]
        assert not bad, f"{case.name}: top-1 differs at positions {bad}"
        deltas.append(np.abs(at_ref - np.array([[v for _, v in ref] for ref in case.ref_top20])).ravel())
    deltas = np.concatenate(deltas)
    # the same bounds as every executor natively (tests/test_golden.py). Measured: mean 0.21, 99th
    # percentile 0.78, max 1.41, where numpy's exact f32 math natively gives 0.20 / 0.70 / 0.99: the
    # kernel rounds x to 8 bits per 32 values, and llama.cpp per 256 for its K-quant weights
    assert deltas.mean() < 0.5, f"mean |Δlogit| {deltas.mean():.3f}"
    assert np.percentile(deltas, 99) < 2.0, f"99th percentile |Δlogit| {np.percentile(deltas, 99):.3f}"
