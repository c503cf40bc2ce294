"""Llama family (llama 2/3, mistral, smollm and other GQA decoders with the same layout):
pre-norm blocks, RoPE on adjacent pairs, SiLU-gated FFN, optional tied output head and
llama-3 style per-frequency RoPE factors (`rope_freqs.weight`)."""

from __future__ import annotations

import math

from ..gguf import GGUFError, GGUFHeader
from ..plan import KVSpec, Op, Plan
from .hparams import (
    DECODER_KEYS,
    DECODER_LAYER_TENSORS,
    DECODER_TENSORS,
    MAX_HEAD_DIM,
    TIED_OUTPUT,
    HParams,
    Key,
    Schema,
    decoder_buffers,
    decoder_sizes,
    logits_ops,
)


def _sizes(hp: HParams) -> dict[str, int]:
    sizes = decoder_sizes(hp)
    n_rot, hd = hp["rope.dimension_count"], sizes["n_embd_head"]
    if n_rot > hd or n_rot % 2:
        raise GGUFError(f"{hp.name('rope.dimension_count')} = {n_rot} must be even and at most "
                        f"{hp.name('attention.key_length')} = {hd}")
    return sizes | {"n_rot_pairs": n_rot // 2}


SCHEMA = Schema(
    keys=DECODER_KEYS | {
        # RoPE may rotate only the first dims of each head
        "rope.dimension_count": Key(int, 2, MAX_HEAD_DIM, default=lambda hp: hp["attention.key_length"]),
    },
    tensors=DECODER_TENSORS,
    layer_tensors=DECODER_LAYER_TENSORS,
    optional_tensors=TIED_OUTPUT | {"rope_freqs.weight": ("n_rot_pairs",)},
    sizes=_sizes,
)


def build_plan(header: GGUFHeader) -> Plan:
    hp = HParams(header, SCHEMA)
    n_layers, d = hp["block_count"], hp["embedding_length"]
    n_heads, n_kv = hp["attention.head_count"], hp["attention.head_count_kv"]
    hd = hp["attention.key_length"]
    eps = hp["attention.layer_norm_rms_epsilon"]
    embd = hp.tensor("token_embd.weight")
    head = header.tensors.get("output.weight", embd)
    freqs = ("rope_freqs.weight",) if "rope_freqs.weight" in header.tensors else ()
    rope = dict(base=hp["rope.freq_base"], scale=1.0 / hp["rope.scaling.factor"],
                head_dim=hd, n_rot=hp["rope.dimension_count"], neox=False)

    def norm(x: str, w: str, out: str) -> Op:
        return Op("rmsnorm", out, (x,), (w,), dict(eps=eps, group=d))

    ops = [Op("embed", "x", ("tokens",), (embd.name,), dict(scale=1.0))]
    for i in range(n_layers):
        p = f"blk.{i}."
        ops += [
            norm("x", p + "attn_norm.weight", "h"),
            Op("matmul", "q", ("h",), (p + "attn_q.weight",)),
            Op("matmul", "k", ("h",), (p + "attn_k.weight",)),
            Op("matmul", "v", ("h",), (p + "attn_v.weight",)),
            Op("rope", "q", ("q",), freqs, dict(rope, n_heads=n_heads)),
            Op("rope", "k", ("k",), freqs, dict(rope, n_heads=n_kv)),
            Op("attention", "a", ("q", "k", "v"), (), dict(
                layer=i, n_heads=n_heads, n_kv_heads=n_kv, head_dim=hd, window=0,
                scale=1.0 / math.sqrt(hd))),
            Op("matmul", "o", ("a",), (p + "attn_output.weight",)),
            Op("add", "x", ("x", "o")),
            norm("x", p + "ffn_norm.weight", "h"),
            Op("glu", "g", ("h",), (p + "ffn_gate.weight", p + "ffn_up.weight"), dict(act="silu")),
            Op("matmul", "f", ("g",), (p + "ffn_down.weight",)),
            Op("add", "x", ("x", "f")),
        ]
    ops += logits_ops(eps, d, head)
    names = {w for op in ops for w in op.weights}
    return Plan("llama", ops, hp.tensors(*sorted(names)), decoder_buffers(hp.sizes), KVSpec(n_layers, n_kv, hd),
                n_vocab=hp.sizes["n_vocab"], n_ctx_train=hp["context_length"])
