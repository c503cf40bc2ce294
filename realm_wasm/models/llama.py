"""Llama family (llama 2/3, mistral, smollm and other GQA decoders with the same layout):
pre-norm blocks, RoPE on adjacent pairs, SiLU-gated FFN, optional tied output head and
llama-3 style per-frequency RoPE factors (`rope_freqs.weight`)."""

from __future__ import annotations

import math

from ..gguf import GGUFHeader
from ..plan import KVSpec, Op, Plan
from .hparams import HParams, decoder_buffers, logits_ops


def build_plan(header: GGUFHeader) -> Plan:
    hp = HParams(header)
    n_layers, d = hp.get("block_count"), hp.get("embedding_length")
    n_heads = hp.get("attention.head_count")
    n_kv = hp.get("attention.head_count_kv", n_heads)
    hd = hp.get("attention.key_length", d // n_heads)
    eps = hp.get("attention.layer_norm_rms_epsilon")
    embd = hp.tensor("token_embd.weight")
    head = header.tensors.get("output.weight", embd)
    freqs = ("rope_freqs.weight",) if "rope_freqs.weight" in header.tensors else ()
    rope = dict(base=hp.get("rope.freq_base", 10_000.0), scale=1.0 / hp.get("rope.scaling.factor", 1.0),
                head_dim=hd, n_rot=hp.get("rope.dimension_count", hd), neox=False)

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
    buffers = decoder_buffers(hp, d, n_heads, n_kv, hd, head.dims[1])
    return Plan("llama", ops, hp.tensors(*sorted(names)), buffers, KVSpec(n_layers, n_kv, hd),
                n_vocab=head.dims[1], n_ctx_train=hp.get("context_length"))
