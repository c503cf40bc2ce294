"""Tiny random-weight models of each architecture family, shared by bench/make_arch_refs.py (which
loads the weights into Hugging Face `transformers` for reference logits) and
tests/test_architectures.py (which writes them to GGUF as llama.cpp's convert_hf_to_gguf.py does).

One generator, from (family, seed): the weights by their Hugging Face names and shapes."""

from __future__ import annotations

import gguf
import numpy as np

BASE = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6, rope_theta=10000.0)
# family -> (transformers config class, its arguments, GGUF architecture)
FAMILIES = {
    "qwen2": ("Qwen2Config", BASE | dict(tie_word_embeddings=True, use_sliding_window=False), "qwen2"),
    "qwen3": ("Qwen3Config", BASE | dict(head_dim=32, tie_word_embeddings=False), "qwen3"),
    "phi3": ("Phi3Config", BASE | dict(tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                       sliding_window=None), "phi3"),
    "mistral": ("MistralConfig", BASE | dict(head_dim=16, sliding_window=5, tie_word_embeddings=False), "llama"),
    "gemma2": ("Gemma2Config", BASE | dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=5,
                                           attn_logit_softcapping=5.0, final_logit_softcapping=3.0,
                                           hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True),
               "gemma2"),
}
TOKENS = [1, 17, 200, 33, 5, 90, 90, 12, 251, 7, 64, 128]  # 12 > the 5-token windows


def head_dim(cfg: dict) -> int:
    return cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]


def hf_shapes(family: str, cfg: dict) -> dict[str, tuple[int, ...]]:
    """Every parameter of the family's transformers model, by its state_dict name."""
    d, f, v, hd = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], head_dim(cfg)
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    shapes = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,)}
    if not cfg["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (v, d)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes |= {p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
                   p + "self_attn.o_proj.weight": (d, q), p + "mlp.down_proj.weight": (d, f)}
        if family == "phi3":
            shapes |= {p + "self_attn.qkv_proj.weight": (q + 2 * kv, d), p + "mlp.gate_up_proj.weight": (2 * f, d)}
        else:
            shapes |= {p + "self_attn.q_proj.weight": (q, d), p + "self_attn.k_proj.weight": (kv, d),
                       p + "self_attn.v_proj.weight": (kv, d), p + "mlp.gate_proj.weight": (f, d),
                       p + "mlp.up_proj.weight": (f, d)}
        if family == "qwen2":
            shapes |= {p + f"self_attn.{x}_proj.bias": (n,) for x, n in (("q", q), ("k", kv), ("v", kv))}
        if family == "qwen3":
            shapes |= {p + "self_attn.q_norm.weight": (hd,), p + "self_attn.k_norm.weight": (hd,)}
        if family == "gemma2":
            shapes |= {p + "pre_feedforward_layernorm.weight": (d,), p + "post_feedforward_layernorm.weight": (d,)}
    return shapes


def hf_weights(family: str, cfg: dict, seed: int) -> dict[str, np.ndarray]:
    """float32 weights from the seed: matrices ~ N(0, 1/K), embeddings N(0, 1), biases N(0, 0.5),
    norm weights near 1 (near 0 for gemma, whose RMSNorm multiplies by 1 + w)."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in sorted(hf_shapes(family, cfg).items()):
        if "norm" in name:
            w = rng.normal(0.0, 0.1, shape) + (0.0 if family == "gemma2" else 1.0)
        elif name.endswith(".bias"):
            w = rng.normal(0.0, 0.5, shape)
        elif "embed_tokens" in name:
            w = rng.normal(0.0, 1.0, shape)
        else:
            w = rng.normal(0.0, 1.0 / np.sqrt(shape[1]), shape)
        out[name] = w.astype(np.float32)
    return out


GGUF_NAMES = {  # transformers name (within a layer) -> llama.cpp's
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.qkv_proj": "attn_qkv", "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.gate_up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}
GEMMA2_NAMES = {"post_attention_layernorm": "post_attention_norm", "pre_feedforward_layernorm": "ffn_norm",
                "post_feedforward_layernorm": "post_ffw_norm"}


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter reorders llama q/k rows so RoPE rotates adjacent pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_name(family: str, name: str) -> str:
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    if name in top:
        return top[name]
    _, _, i, rest = name.split(".", 3)
    module, kind = rest.rsplit(".", 1)
    names = GGUF_NAMES | (GEMMA2_NAMES if family == "gemma2" else {})
    return f"blk.{i}.{names[module]}.{kind}"


def add_tokenizer(w: gguf.GGUFWriter, v: int) -> None:
    """A minimal valid SentencePiece-style vocabulary of v tokens: specials, then byte tokens."""
    w.add_tokenizer_model("llama")
    w.add_token_list(["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)][: v - 3])
    w.add_token_scores([0.0] * v)
    w.add_token_types([2, 3, 3] + [6] * (v - 3))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)


def write_gguf(path, family: str, cfg: dict, weights: dict[str, np.ndarray]) -> None:
    """The model as llama.cpp's convert_hf_to_gguf.py writes it (f32), with a minimal tokenizer."""
    arch = FAMILIES[family][2]
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(cfg["rope_theta"])
    if "head_dim" in cfg:
        w.add_key_length(cfg["head_dim"])
        w.add_value_length(cfg["head_dim"])
    if cfg.get("sliding_window"):
        w.add_sliding_window(cfg["sliding_window"])
    if family == "gemma2":
        w.add_attn_logit_softcapping(cfg["attn_logit_softcapping"])
        w.add_final_logit_softcapping(cfg["final_logit_softcapping"])
    add_tokenizer(w, cfg["vocab_size"])
    for name, data in weights.items():
        if arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = cfg["num_attention_heads" if "q_proj" in name else "num_key_value_heads"]
            data = _permute(data, heads)
        if family == "gemma2" and name.endswith("norm.weight"):
            data = data + 1.0  # the converter folds gemma's 1 + w into the weight
        w.add_tensor(gguf_name(family, name), np.ascontiguousarray(data, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
