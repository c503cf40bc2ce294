"""Every executor with a LoRA adapter against llama.cpp (../shared/golden/lora-gemma-3-270m).

llama.cpp's greedy continuations of four prompts with the default model and a rank-8 adapter at
scale 1.0 and 0.5, and without it; checked, as the other golden tests, only where llama.cpp's top-1
beats its top-2 by MIN_MARGIN: the greedy tokens up to the first step below it, and (numpy, where
it is cheap) the teacher-forced top-1 of every step at or above it.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from golden import LORA_GOLDEN_DIR, MIN_MARGIN

from realm_wasm.engine import Engine
from realm_wasm.model_files import default_model_path

GOLDEN = json.loads((LORA_GOLDEN_DIR / "golden.json").read_text())
SCALES = {"base": None, "lora_1.0": 1.0, "lora_0.5": 0.5}
CASES = [(run, name) for run in SCALES for name in GOLDEN["runs"][run]]
# lavapipe runs the default model at a few tokens a second: a prompt of 5 tokens (mat-vecs only) and one
# of 12 (the prefill's mat-mats and their LoRA kernel), a greedy step or two each
GPU_CASES = [("lora_1.0", "story"), ("lora_0.5", "qa")]


def load(backend: str) -> Engine:
    return Engine.load(os.environ.get("REALM_TEST_MODEL") or default_model_path(), backend=backend, n_ctx=256,
                       adapters={"golden": LORA_GOLDEN_DIR / "adapter.gguf"})


@pytest.fixture(scope="module")
def numpy_engine() -> Engine:
    return load("numpy")


def lora(run: str) -> tuple[tuple[str, float], ...]:
    return (("golden", SCALES[run]),) if SCALES[run] is not None else ()


def checked_steps(case: dict) -> int:
    return next((i for i, m in enumerate(case["margins"]) if m < MIN_MARGIN), len(case["margins"]))


def check_greedy(engine: Engine, run: str, name: str) -> None:
    case = GOLDEN["runs"][run][name]
    steps = checked_steps(case)
    got = [e.token_id for e in engine.generate(case["prompt"], steps, stop_at_eos=False, lora=lora(run))
           if e.token_id is not None]
    assert got == case["greedy_ids"][:steps]


def test_the_golden_adapter_changes_what_llama_cpp_says():
    runs = GOLDEN["runs"]
    assert all(runs["lora_1.0"][name]["greedy_ids"] != runs["base"][name]["greedy_ids"] for name in runs["base"])


@pytest.mark.parametrize("run,name", CASES, ids=[f"{r}-{n}" for r, n in CASES])
def test_numpy_teacher_forced_top1_matches_llama_cpp(numpy_engine, run, name):
    case = GOLDEN["runs"][run][name]
    ids = numpy_engine.tokenizer.encode(case["prompt"])
    forced = ids + case["greedy_ids"][:-1]
    logits = np.concatenate(list(numpy_engine.prefill(forced, all_logits=True, lora=lora(run))))[len(ids) - 1:]
    top = logits.argmax(axis=-1)
    bad = [i for i, (t, want, margin) in enumerate(zip(top, case["greedy_ids"], case["margins"], strict=True))
           if margin >= MIN_MARGIN and t != want]
    assert not bad, f"top-1 differs from llama.cpp at steps {bad}"


# the generation loop itself (the scheduler's batches with the adapter table), where a step is checked
GREEDY_CASES = [(run, name) for run, name in CASES if run != "base" and checked_steps(GOLDEN["runs"][run][name])]


@pytest.mark.parametrize("run,name", GREEDY_CASES, ids=[f"{r}-{n}" for r, n in GREEDY_CASES])
def test_numpy_greedy_matches_llama_cpp(numpy_engine, run, name):
    check_greedy(numpy_engine, run, name)


@pytest.fixture(scope="module")
def webgpu_engine(gpu) -> Engine:
    return load("webgpu")


@pytest.mark.parametrize("run,name", GPU_CASES, ids=[f"{r}-{n}" for r, n in GPU_CASES])
def test_webgpu_greedy_matches_llama_cpp(webgpu_engine, run, name):
    check_greedy(webgpu_engine, run, name)
