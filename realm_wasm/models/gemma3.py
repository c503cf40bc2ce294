"""Gemma 2 and Gemma 3: sliding-window layers interleaved with global ones, post-norms after
attention and FFN, GELU-gated FFN, embeddings scaled by sqrt(n_embd) and tied to the output head.
Gemma 3 adds Q/K norms and its own RoPE base on local layers; Gemma 2 soft-caps attention scores
and the final logits (c·tanh(s / c)) instead."""

from __future__ import annotations

import math
from dataclasses import dataclass

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

POST_NORMS = {"post_attention_norm.weight": ("n_embd",), "post_ffw_norm.weight": ("n_embd",)}
QK_NORMS = {"attn_q_norm.weight": ("n_embd_head",), "attn_k_norm.weight": ("n_embd_head",)}


@dataclass(frozen=True)
class Generation:
    """What sets one Gemma generation apart."""

    global_every: int  # layers (n + 1) * global_every - 1 attend globally, the others in a window
    local_rope_base: float | None  # the window layers' RoPE base (not stored in the GGUF); None: rope.freq_base
    qk_norm: bool  # per-head RMSNorm of q and k before RoPE
    softcap: bool  # attention scores and final logits soft-capped ({arch}.attn_logit_softcapping, ...)


GENERATIONS = {
    "gemma2": Generation(global_every=2, local_rope_base=None, qk_norm=False, softcap=True),
    "gemma3": Generation(global_every=6, local_rope_base=10_000.0, qk_norm=True, softcap=False),
}

SOFTCAP_KEYS = {  # llama.cpp's defaults where a file leaves them out
    "attn_logit_softcapping": Key(float, 0.0, 1e6, default=50.0),
    "final_logit_softcapping": Key(float, 0.0, 1e6, default=30.0),
}


def schema(gen: Generation) -> Schema:
    return Schema(
        keys=DECODER_KEYS | {
            "rope.freq_base": Key(float, 1.0, 1e12, default=1e6 if gen.local_rope_base else 10_000.0),
            "attention.sliding_window": Key(int, 1, MAX_CONTEXT),
        } | (SOFTCAP_KEYS if gen.softcap else {}),
        tensors=DECODER_TENSORS,
        layer_tensors=DECODER_LAYER_TENSORS | POST_NORMS | (QK_NORMS if gen.qk_norm else {}),
        optional_tensors=TIED_OUTPUT,
        sizes=decoder_sizes,
    )


SCHEMAS = {arch: schema(gen) for arch, gen in GENERATIONS.items()}
SCHEMA = SCHEMAS["gemma3"]


def build_plan(header: GGUFHeader) -> Plan:
    arch = header.architecture
    gen, hp = GENERATIONS[arch], HParams(header, SCHEMAS[arch])
    n_layers, d = hp["block_count"], hp["embedding_length"]
    n_heads, n_kv = hp["attention.head_count"], hp["attention.head_count_kv"]
    hd = hp["attention.key_length"]
    eps = hp["attention.layer_norm_rms_epsilon"]
    window = hp["attention.sliding_window"]
    attn_cap = hp["attn_logit_softcapping"] if gen.softcap else 0.0
    rope_global = dict(base=hp["rope.freq_base"], scale=1.0 / hp["rope.scaling.factor"])
    rope_local = dict(base=gen.local_rope_base, scale=1.0) if gen.local_rope_base else rope_global
    embd = hp.tensor("token_embd.weight")
    head = header.tensors.get("output.weight", embd)

    def norm(x: str, w: str, out: str, group: int = d) -> Op:
        return Op("rmsnorm", out, (x,), (w,), dict(eps=eps, group=group))

    ops = [Op("embed", "x", ("tokens",), (embd.name,), dict(scale=math.sqrt(d)))]
    for i in range(n_layers):
        p = f"blk.{i}."
        is_global = (i + 1) % gen.global_every == 0
        rope = dict(rope_global if is_global else rope_local, head_dim=hd, n_rot=hd, neox=True)
        qk_norms = [norm("q", p + "attn_q_norm.weight", "q", group=hd),
                    norm("k", p + "attn_k_norm.weight", "k", group=hd)] if gen.qk_norm else []
        ops += [
            norm("x", p + "attn_norm.weight", "h"),
            Op("matmul", "q", ("h",), (p + "attn_q.weight",)),
            Op("matmul", "k", ("h",), (p + "attn_k.weight",)),
            Op("matmul", "v", ("h",), (p + "attn_v.weight",)),
            *qk_norms,
            Op("rope", "q", ("q",), (), dict(rope, n_heads=n_heads)),
            Op("rope", "k", ("k",), (), dict(rope, n_heads=n_kv)),
            Op("attention", "a", ("q", "k", "v"), (), dict(
                layer=i, n_heads=n_heads, n_kv_heads=n_kv, head_dim=hd,
                window=0 if is_global else window, scale=1.0 / math.sqrt(hd), softcap=attn_cap)),
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
    if gen.softcap and hp["final_logit_softcapping"] > 0:
        ops.append(Op("softcap", "logits", ("logits",), (), dict(cap=hp["final_logit_softcapping"])))
    names = {w for op in ops for w in op.weights}
    return Plan(arch, ops, hp.tensors(*sorted(names)), decoder_buffers(hp.sizes), KVSpec(n_layers, n_kv, hd),
                n_vocab=hp.sizes["n_vocab"], n_ctx_train=hp["context_length"])
