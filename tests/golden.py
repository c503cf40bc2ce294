"""llama.cpp's reference outputs for the bundled models (../shared/golden) and how we judge against them.

One folder per model (GOLDEN_MODELS). Each case holds the prompt's token ids, llama.cpp's top-20
logits at every prompt position and at every greedy step, and its greedy tokens (32, fewer where
it stopped at end of text). llama.cpp rounds activations to 8 bits inside quantized matmuls, so
exact logits are not expected: top-1 must agree wherever the reference's top-1/top-2 margin is at
least MIN_MARGIN, and greedy generation must agree up to the first step below it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

GOLDEN_ROOT = Path(os.environ.get("REALM_GOLDEN_DIR") or Path(__file__).resolve().parents[2] / "shared" / "golden")
# bundled model name (realm_wasm.model_files.BUNDLED) -> its folder of llama.cpp outputs
GOLDEN_MODELS = {
    "gemma-3-270m-q4_k_m": GOLDEN_ROOT / "gemma-3-270m-q4_k_m",
    "smollm2-135m-instruct-q4_1": GOLDEN_ROOT / "smollm2-135m-instruct-q4_1",
}
GOLDEN_DIR = GOLDEN_MODELS["gemma-3-270m-q4_k_m"]  # the default model's
MIN_MARGIN = 1.0
LORA_GOLDEN_DIR = GOLDEN_DIR.parent / "lora-gemma-3-270m"  # a LoRA adapter and llama.cpp's outputs with it


def _decode(value):
    return json.loads(value) if isinstance(value, str) else value


@dataclass
class GoldenCase:
    name: str
    prompt: str
    token_ids: list[int]
    greedy_ids: list[int]
    greedy_text: str
    ref_top20: list[list[tuple[int, float]]]  # reference top-20 at each position of `forced_ids`

    @property
    def forced_ids(self) -> list[int]:
        """Prompt then greedy tokens: every position whose next-token logits the reference holds."""
        return self.token_ids + self.greedy_ids[:-1]

    def margin(self, i: int) -> float:
        return self.ref_top20[i][0][1] - self.ref_top20[i][1][1]

    def greedy_margin(self, step: int) -> float:
        return self.margin(len(self.token_ids) - 1 + step)

    def compare(self, logits: np.ndarray) -> tuple[list[int], np.ndarray]:
        """Positions where our top-1 differs (reference margin >= MIN_MARGIN) and all |Δlogit| on top-20."""
        bad, deltas = [], []
        for i, ref in enumerate(self.ref_top20):
            ids = [t for t, _ in ref]
            deltas.append(np.abs(logits[i][ids] - np.array([v for _, v in ref])))
            if self.margin(i) >= MIN_MARGIN and int(np.argmax(logits[i])) != ids[0]:
                bad.append(i)
        return bad, np.concatenate(deltas)

    def greedy_checked_steps(self) -> int:
        """Greedy steps that must agree: up to (not including) the first with margin < MIN_MARGIN."""
        for step in range(len(self.greedy_ids)):
            if self.greedy_margin(step) < MIN_MARGIN:
                return step
        return len(self.greedy_ids)


def golden_dir(model: str) -> Path:
    path = GOLDEN_MODELS[model]
    if not path.is_dir():  # a missing reference must fail the suite, not skip it
        raise FileNotFoundError(f"golden data not found at {path} (set REALM_GOLDEN_DIR)")
    return path


def load_cases(model: str = "gemma-3-270m-q4_k_m") -> list[GoldenCase]:
    cases = []
    for path in sorted(golden_dir(model).glob("*.json")):
        if path.name in ("tokenizer.json", "SOURCE.json"):
            continue
        g = json.loads(path.read_text())
        per_pos = _decode(g["top20_logits_per_position"])
        per_step = _decode(g["top20_logits_per_greedy_step"])
        # step 0's logits are the last prompt position's; later steps follow the forced greedy tokens
        cases.append(GoldenCase(path.stem, g["prompt"], g["token_ids"], g["greedy_ids"], g["greedy_text"],
                                per_pos + per_step[1:]))
    return cases


def load_tokenizer_cases(model: str) -> list[dict]:
    """llama.cpp's ids (no BOS) for short texts: [{"text", "ids_no_bos"}]."""
    return json.loads((golden_dir(model) / "tokenizer.json").read_text())
