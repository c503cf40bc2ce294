"""Reference logits of tiny random models of each family from Hugging Face `transformers` (float32),
written to tests/data/arch_<family>.npz for tests/test_architectures.py: the seed, the config, the
token ids and the logits (KBs; the test regenerates the weights from the seed, tests/arch_families.py).

Dev-time only, in its own venv (never a test dependency):
    python3 -m venv /tmp/refvenv && /tmp/refvenv/bin/pip install torch transformers gguf numpy
    PYTHONPATH=tests /tmp/refvenv/bin/python bench/make_arch_refs.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
import transformers
from arch_families import FAMILIES, TOKENS, hf_weights

SEED = 15
OUT = Path(__file__).resolve().parent.parent / "tests" / "data"


def reference(family: str) -> np.ndarray:
    config_class, cfg, _ = FAMILIES[family]
    config = getattr(transformers, config_class)(**cfg, attn_implementation="eager")
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    state = {k: torch.from_numpy(v) for k, v in hf_weights(family, cfg, SEED).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    # a tied head is the embedding: the only key the state may lack
    if unexpected or set(missing) - {"lm_head.weight"}:
        sys.exit(f"{family}: weights do not match transformers' model: missing {missing}, unexpected {unexpected}")
    with torch.no_grad():
        return model(torch.tensor([TOKENS])).logits[0].numpy().astype(np.float32)


if __name__ == "__main__":
    OUT.mkdir(exist_ok=True)
    for family in sys.argv[1:] or FAMILIES:
        logits = reference(family)
        np.savez_compressed(OUT / f"arch_{family}.npz", seed=SEED, config=json.dumps(FAMILIES[family][1]),
                            tokens=np.array(TOKENS, np.int32), logits=logits)
        print(f"{family}: logits {logits.shape}, |max| {np.abs(logits).max():.3f} "
              f"(transformers {transformers.__version__})")
