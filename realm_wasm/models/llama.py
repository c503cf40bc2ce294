"""Llama-like decoders, one row of `FAMILIES` each: llama 2/3 (smollm and other GQA models of the
same layout), mistral (a sliding window on every layer when the file gives one), qwen2 (q, k, v
biases), qwen3 (per-head Q/K norms) and phi3 (q, k, v in one tensor, gate and up in another).
All: pre-norm blocks, RoPE, SiLU-gated FFN, an optional tied output head and llama-3 style
per-frequency RoPE factors (`rope_freqs.weight`)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..gguf import GGUFError, GGUFHeader, TensorInfo
from ..plan import KVSpec, Op, Plan
from .hparams import (
    DECODER_KEYS,
    DECODER_LAYER_TENSORS,
    DECODER_TENSORS,
    MAX_CONTEXT,
    MAX_HEAD_DIM,
    TIED_OUTPUT,
    HParams,
    Key,
    Schema,
    decoder_buffers,
    decoder_sizes,
    logits_ops,
    row_view,
)


@dataclass(frozen=True)
class Family:
    """What sets one llama-like architecture apart."""

    neox: bool  # RoPE rotates dims (i, i + n/2) (HF's rotate_half), not (2i, 2i + 1) (llama.cpp's
    #             converter permutes llama's q and k rows into the latter)
    sliding_window: bool = False  # {arch}.attention.sliding_window, if given, applies to every layer
    qkv_bias: bool = False  # q, k and v projections add a bias
    qk_norm: bool = False  # per-head RMSNorm of q and k before RoPE
    fused: bool = False  # attn_qkv holds q, k, v rows; ffn_up holds gate then up rows


FAMILIES = {
    "llama": Family(neox=False, sliding_window=True),
    "mistral": Family(neox=False, sliding_window=True),
    "qwen2": Family(neox=True, qkv_bias=True),
    "qwen3": Family(neox=True, qk_norm=True),
    "phi3": Family(neox=True, fused=True),  # llama.cpp ignores phi3's sliding window too
}

SPLIT_LAYER_TENSORS = {"attn_q.weight", "attn_k.weight", "attn_v.weight", "ffn_gate.weight", "ffn_up.weight"}
FUSED_LAYER_TENSORS = {"attn_qkv.weight": ("n_embd", "n_embd_qkv"), "ffn_up.weight": ("n_embd", "n_ff_gate_up")}
QKV_BIASES = {"attn_q.bias": ("n_embd_q",), "attn_k.bias": ("n_embd_kv",), "attn_v.bias": ("n_embd_kv",)}
QK_NORMS = {"attn_q_norm.weight": ("n_embd_head",), "attn_k_norm.weight": ("n_embd_head",)}


def _sizes(hp: HParams) -> dict[str, int]:
    sizes = decoder_sizes(hp)
    n_rot, hd = hp["rope.dimension_count"], sizes["n_embd_head"]
    if n_rot > hd or n_rot % 2:
        raise GGUFError(f"{hp.name('rope.dimension_count')} = {n_rot} must be even and at most "
                        f"{hp.name('attention.key_length')} = {hd}")
    sizes["n_rot_pairs"] = n_rot // 2
    if FAMILIES[hp.arch].fused:
        sizes |= {"n_embd_qkv": sizes["n_embd_q"] + 2 * sizes["n_embd_kv"], "n_ff_gate_up": 2 * sizes["n_ff"]}
    return sizes


def schema(family: Family) -> Schema:
    layer = dict(DECODER_LAYER_TENSORS)
    if family.fused:
        layer = {n: s for n, s in layer.items() if n not in SPLIT_LAYER_TENSORS} | FUSED_LAYER_TENSORS
    return Schema(
        keys=DECODER_KEYS | {
            # RoPE may rotate only the first dims of each head
            "rope.dimension_count": Key(int, 2, MAX_HEAD_DIM, default=lambda hp: hp["attention.key_length"]),
        } | ({"attention.sliding_window": Key(int, 0, MAX_CONTEXT, default=0)} if family.sliding_window else {}),
        tensors=DECODER_TENSORS,
        layer_tensors=layer | (QKV_BIASES if family.qkv_bias else {}) | (QK_NORMS if family.qk_norm else {}),
        optional_tensors=TIED_OUTPUT | {"rope_freqs.weight": ("n_rot_pairs",)},
        sizes=_sizes,
    )


SCHEMAS = {arch: schema(family) for arch, family in FAMILIES.items()}
SCHEMA = SCHEMAS["llama"]


def _fused_views(hp: HParams, p: str) -> dict[str, TensorInfo]:
    """phi3's joined tensors as the separate weights the plan names: row ranges of the file's
    tensor (its rows are q, k, v and gate, up, in that order, as llama.cpp reads them)."""
    q, kv, ff = hp.sizes["n_embd_q"], hp.sizes["n_embd_kv"], hp.sizes["n_ff"]
    qkv, up = hp.tensor(p + "attn_qkv.weight"), hp.tensor(p + "ffn_up.weight")
    return {p + "attn_q.weight": row_view(qkv, 0, q, "q"), p + "attn_k.weight": row_view(qkv, q, kv, "k"),
            p + "attn_v.weight": row_view(qkv, q + kv, kv, "v"),
            p + "ffn_gate.weight": row_view(up, 0, ff, "gate"), p + "ffn_up.weight": row_view(up, ff, ff, "up")}


def build_plan(header: GGUFHeader) -> Plan:
    arch = header.architecture
    family, hp = FAMILIES[arch], HParams(header, SCHEMAS[arch])
    n_layers, d = hp["block_count"], hp["embedding_length"]
    n_heads, n_kv = hp["attention.head_count"], hp["attention.head_count_kv"]
    hd = hp["attention.key_length"]
    eps = hp["attention.layer_norm_rms_epsilon"]
    window = hp["attention.sliding_window"] if family.sliding_window else 0
    embd = hp.tensor("token_embd.weight")
    head = header.tensors.get("output.weight", embd)
    freqs = ("rope_freqs.weight",) if "rope_freqs.weight" in header.tensors else ()
    rope = dict(base=hp["rope.freq_base"], scale=1.0 / hp["rope.scaling.factor"],
                head_dim=hd, n_rot=hp["rope.dimension_count"], neox=family.neox)
    views: dict[str, TensorInfo] = {}

    def norm(x: str, w: str, out: str, group: int = d) -> Op:
        return Op("rmsnorm", out, (x,), (w,), dict(eps=eps, group=group))

    ops = [Op("embed", "x", ("tokens",), (embd.name,), dict(scale=1.0))]
    for i in range(n_layers):
        p = f"blk.{i}."
        if family.fused:
            views |= _fused_views(hp, p)
        biases = [Op("bias", x, (x,), (f"{p}attn_{x}.bias",)) for x in "qkv"] if family.qkv_bias else []
        qk_norms = [norm(x, f"{p}attn_{x}_norm.weight", x, group=hd) for x in "qk"] if family.qk_norm else []
        ops += [
            norm("x", p + "attn_norm.weight", "h"),
            Op("matmul", "q", ("h",), (p + "attn_q.weight",)),
            Op("matmul", "k", ("h",), (p + "attn_k.weight",)),
            Op("matmul", "v", ("h",), (p + "attn_v.weight",)),
            *biases,
            *qk_norms,
            Op("rope", "q", ("q",), freqs, dict(rope, n_heads=n_heads)),
            Op("rope", "k", ("k",), freqs, dict(rope, n_heads=n_kv)),
            Op("attention", "a", ("q", "k", "v"), (), dict(
                layer=i, n_heads=n_heads, n_kv_heads=n_kv, head_dim=hd, window=window,
                scale=1.0 / math.sqrt(hd))),
            Op("matmul", "o", ("a",), (p + "attn_output.weight",)),
            Op("add", "x", ("x", "o")),
            norm("x", p + "ffn_norm.weight", "h"),
            Op("glu", "g", ("h",), (p + "ffn_gate.weight", p + "ffn_up.weight"), dict(act="silu")),
            Op("matmul", "f", ("g",), (p + "ffn_down.weight",)),
            Op("add", "x", ("x", "f")),
        ]
    ops += logits_ops(eps, d, head)
    names = sorted({w for op in ops for w in op.weights})
    weights = {n: views[n] if n in views else hp.tensor(n) for n in names}
    return Plan(arch, ops, weights, decoder_buffers(hp.sizes), KVSpec(n_layers, n_kv, hd),
                n_vocab=hp.sizes["n_vocab"], n_ctx_train=hp["context_length"])
