"""Gemma 3: interleaved sliding-window / global attention, Q/K norms, post-norms, GELU-gated FFN,
embeddings scaled by sqrt(n_embd) and tied to the output head."""

from __future__ import annotations

import math

from ..gguf import GGUFHeader
from ..plan import KVSpec, Op, Plan
from .hparams import (
    DECODER_KEYS,
    DECODER_LAYER_TENSORS,
    DECODER_TENSORS,
    MAX_CONTEXT,
    TIED_OUTPUT,
    HParams,
    Key,
    Schema,
    decoder_buffers,
    decoder_sizes,
    logits_ops,
)

GLOBAL_EVERY = 6  # llama.cpp's fixed gemma3 pattern: layers 5, 11, 17, ... attend globally
LOCAL_ROPE_BASE = 10_000.0  # sliding-window layers' RoPE base (not stored in the GGUF)

SCHEMA = Schema(
    keys=DECODER_KEYS | {
        "rope.freq_base": Key(float, 1.0, 1e12, default=1e6),  # the global layers' base
        "attention.sliding_window": Key(int, 1, MAX_CONTEXT),
    },
    tensors=DECODER_TENSORS,
    layer_tensors=DECODER_LAYER_TENSORS | {
        "attn_q_norm.weight": ("n_embd_head",),
        "attn_k_norm.weight": ("n_embd_head",),
        "post_attention_norm.weight": ("n_embd",),
        "post_ffw_norm.weight": ("n_embd",),
    },
    optional_tensors=TIED_OUTPUT,
    sizes=decoder_sizes,
)


def build_plan(header: GGUFHeader) -> Plan:
    hp = HParams(header, SCHEMA)
    n_layers, d = hp["block_count"], hp["embedding_length"]
    n_heads, n_kv = hp["attention.head_count"], hp["attention.head_count_kv"]
    hd = hp["attention.key_length"]
    eps = hp["attention.layer_norm_rms_epsilon"]
    window = hp["attention.sliding_window"]
    rope_global = dict(base=hp["rope.freq_base"], scale=1.0 / hp["rope.scaling.factor"])
    rope_local = dict(base=LOCAL_ROPE_BASE, scale=1.0)
    embd = hp.tensor("token_embd.weight")
    head = header.tensors.get("output.weight", embd)

    def norm(x: str, w: str, out: str, group: int = d) -> Op:
        return Op("rmsnorm", out, (x,), (w,), dict(eps=eps, group=group))

    ops = [Op("embed", "x", ("tokens",), (embd.name,), dict(scale=math.sqrt(d)))]
    for i in range(n_layers):
        p = f"blk.{i}."
        is_global = (i + 1) % GLOBAL_EVERY == 0
        rope = dict(rope_global if is_global else rope_local, head_dim=hd, n_rot=hd, neox=True)
        ops += [
            norm("x", p + "attn_norm.weight", "h"),
            Op("matmul", "q", ("h",), (p + "attn_q.weight",)),
            Op("matmul", "k", ("h",), (p + "attn_k.weight",)),
            Op("matmul", "v", ("h",), (p + "attn_v.weight",)),
            norm("q", p + "attn_q_norm.weight", "q", group=hd),
            norm("k", p + "attn_k_norm.weight", "k", group=hd),
            Op("rope", "q", ("q",), (), dict(rope, n_heads=n_heads)),
            Op("rope", "k", ("k",), (), dict(rope, n_heads=n_kv)),
            Op("attention", "a", ("q", "k", "v"), (), dict(
                layer=i, n_heads=n_heads, n_kv_heads=n_kv, head_dim=hd,
                window=0 if is_global else window, scale=1.0 / math.sqrt(hd))),
            Op("matmul", "o", ("a",), (p + "attn_output.weight",)),
            norm("o", p + "post_attention_norm.weight", "o"),
            Op("add", "x", ("x", "o")),
            norm("x", p + "ffn_norm.weight", "h"),
            Op("glu", "g", ("h",), (p + "ffn_gate.weight", p + "ffn_up.weight"), dict(act="gelu")),
            Op("matmul", "f", ("g",), (p + "ffn_down.weight",)),
            norm("f", p + "post_ffw_norm.weight", "f"),
            Op("add", "x", ("x", "f")),
        ]
    ops += logits_ops(eps, d, head)
    names = {w for op in ops for w in op.weights}
    return Plan("gemma3", ops, hp.tensors(*sorted(names)), decoder_buffers(hp.sizes), KVSpec(n_layers, n_kv, hd),
                n_vocab=hp.sizes["n_vocab"], n_ctx_train=hp["context_length"])
