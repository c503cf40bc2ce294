"""The llama plan on small random GGUF files, against an independent per-token numpy forward pass."""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from realm_wasm.cpu import CpuExecutor, QuantizedWeight
from realm_wasm.gguf import read_gguf
from realm_wasm.models import build_plan
from realm_wasm.plan import Batch

Q = gguf.GGMLQuantizationType
D, N_HEADS, N_KV, HD, FFN, VOCAB, LAYERS = 64, 4, 2, 16, 128, 96, 2
EPS, BASE = 1e-5, 10000.0


def make_model(path, rng, weight_type, tied: bool, rope_freqs: bool) -> dict[str, np.ndarray]:
    """Write a random llama GGUF; return the exact float32 weights the file holds."""
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(256)
    w.add_embedding_length(D)
    w.add_block_count(LAYERS)
    w.add_feed_forward_length(FFN)
    w.add_head_count(N_HEADS)
    w.add_head_count_kv(N_KV)
    w.add_layer_norm_rms_eps(EPS)
    w.add_rope_freq_base(BASE)
    weights = {}

    def add(name, shape, qtype=Q.F32, scale=0.3):
        data = (rng.standard_normal(shape) * scale).astype(np.float32)
        if qtype == Q.F32:
            w.add_tensor(name, data)
        else:
            raw = gguf.quants.quantize(data, qtype)
            w.add_tensor(name, raw, raw_dtype=qtype)
            data = gguf.quants.dequantize(raw, qtype).reshape(shape)
        weights[name] = data

    add("token_embd.weight", (VOCAB, D), Q.Q8_0, 1.0)
    if not tied:
        add("output.weight", (VOCAB, D), Q.F16)
    add("output_norm.weight", (D,), scale=1.0)
    if rope_freqs:
        weights["rope_freqs.weight"] = rng.uniform(1.0, 8.0, HD // 2).astype(np.float32)
        w.add_tensor("rope_freqs.weight", weights["rope_freqs.weight"])
    for i in range(LAYERS):
        p = f"blk.{i}."
        add(p + "attn_norm.weight", (D,), scale=1.0)
        add(p + "ffn_norm.weight", (D,), scale=1.0)
        add(p + "attn_q.weight", (N_HEADS * HD, D), weight_type)
        add(p + "attn_k.weight", (N_KV * HD, D), weight_type)
        add(p + "attn_v.weight", (N_KV * HD, D), Q.Q8_0)
        add(p + "attn_output.weight", (D, N_HEADS * HD), weight_type)
        add(p + "ffn_gate.weight", (FFN, D), weight_type)
        add(p + "ffn_up.weight", (FFN, D), Q.Q5_1)
        add(p + "ffn_down.weight", (D, FFN), weight_type, 0.1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return weights


def reference_logits(wt: dict[str, np.ndarray], tokens: list[int]) -> np.ndarray:
    """Meta-style llama forward, one token at a time, float64, rotary embedding as complex numbers."""
    def rms(x, g):
        return x / np.sqrt(np.mean(x * x) + EPS) * g

    freqs = BASE ** (-np.arange(0, HD, 2) / HD)
    if "rope_freqs.weight" in wt:
        freqs = freqs / wt["rope_freqs.weight"]
    keys = [[] for _ in range(LAYERS)]
    values = [[] for _ in range(LAYERS)]
    out = []
    for pos, tok in enumerate(tokens):
        x = wt["token_embd.weight"][tok].astype(np.float64)
        rot = np.exp(1j * pos * freqs)
        for i in range(LAYERS):
            p = f"blk.{i}."
            h = rms(x, wt[p + "attn_norm.weight"])
            q = (wt[p + "attn_q.weight"] @ h).reshape(N_HEADS, HD)
            k = (wt[p + "attn_k.weight"] @ h).reshape(N_KV, HD)
            q = (q.view(np.complex128) * rot).view(np.float64)
            k = (k.view(np.complex128) * rot).view(np.float64)
            keys[i].append(k)
            values[i].append((wt[p + "attn_v.weight"] @ h).reshape(N_KV, HD))
            att = np.zeros((N_HEADS, HD))
            for hh in range(N_HEADS):
                kv = hh // (N_HEADS // N_KV)
                s = np.array([q[hh] @ kk[kv] for kk in keys[i]]) / np.sqrt(HD)
                s = np.exp(s - s.max())
                att[hh] = (s / s.sum()) @ np.array([vv[kv] for vv in values[i]])
            x = x + wt[p + "attn_output.weight"] @ att.reshape(-1)
            h = rms(x, wt[p + "ffn_norm.weight"])
            g = wt[p + "ffn_gate.weight"] @ h
            x = x + wt[p + "ffn_down.weight"] @ (g / (1 + np.exp(-g)) * (wt[p + "ffn_up.weight"] @ h))
        head = wt.get("output.weight", wt["token_embd.weight"])
        out.append(head @ rms(x, wt["output_norm.weight"]))
    return np.array(out)


@pytest.mark.parametrize("weight_type, tied, rope_freqs", [
    (Q.Q4_0, True, False), (Q.Q8_0, False, True), (Q.F16, True, False), (Q.Q5_0, False, False),
])
def test_llama_matches_independent_forward(tmp_path, weight_type, tied, rope_freqs):
    rng = np.random.default_rng(int(weight_type))
    path = tmp_path / "llama.gguf"
    wt = make_model(path, rng, weight_type, tied, rope_freqs)
    tokens = [int(t) for t in rng.integers(0, VOCAB, 12)]
    ref = reference_logits(wt, tokens)

    f = read_gguf(path)
    ex = CpuExecutor(build_plan(f.header), f.tensor_bytes, n_slots=2, n_ctx=64)
    # prefill 7 tokens in one step, then decode one at a time
    got = [ex.forward(Batch.for_sequence(tokens[:7], 0, all_logits=True))]
    got += [ex.forward(Batch.for_sequence([t], 7 + i)) for i, t in enumerate(tokens[7:])]
    np.testing.assert_allclose(np.concatenate(got), ref, rtol=0, atol=2e-3 * np.abs(ref).max())


def test_two_sequences_in_one_batch_match_running_alone(tmp_path):
    rng = np.random.default_rng(1)
    path = tmp_path / "llama.gguf"
    make_model(path, rng, Q.Q8_0, True, False)
    f = read_gguf(path)
    plan = build_plan(f.header)
    a, b = [5, 9, 2, 33, 7], [1, 80, 64]
    alone = CpuExecutor(plan, f.tensor_bytes, n_slots=1, n_ctx=32)
    ref_a = alone.forward(Batch.for_sequence(a, 0, all_logits=True))
    ref_b = alone.forward(Batch.for_sequence(b, 0, all_logits=True))

    both = CpuExecutor(plan, f.tensor_bytes, n_slots=2, n_ctx=32)
    # sequence a prefills 3 tokens while b prefills all 3 in the same step; then a gets 2 more
    step1 = Batch(np.array(a[:3] + b, np.int32), np.array([0, 1, 2, 0, 1, 2], np.int32),
                  np.array([0, 0, 0, 1, 1, 1], np.int32), np.arange(6, dtype=np.int32))
    l1 = both.forward(step1)
    l2 = both.forward(Batch.for_sequence(a[3:], 3, slot=0, all_logits=True))
    np.testing.assert_allclose(np.concatenate([l1[:3], l2]), ref_a, atol=1e-4)
    np.testing.assert_allclose(l1[3:], ref_b, atol=1e-4)


def test_rolling_back_a_sequence_overwrites_rejected_tokens(tmp_path):
    """Speculative decoding rolls back by re-feeding from an earlier position."""
    rng = np.random.default_rng(2)
    path = tmp_path / "llama.gguf"
    make_model(path, rng, Q.Q8_0, True, False)
    f = read_gguf(path)
    ex = CpuExecutor(build_plan(f.header), f.tensor_bytes, n_ctx=32)
    ex.forward(Batch.for_sequence([4, 5, 6, 7, 8], 0))  # 7, 8 are "rejected drafts"
    after = ex.forward(Batch.for_sequence([9], 3))
    fresh = CpuExecutor(build_plan(f.header), f.tensor_bytes, n_ctx=32)
    expect = fresh.forward(Batch.for_sequence([4, 5, 6, 9], 0))
    np.testing.assert_allclose(after, expect, atol=1e-5)


def test_weights_kept_quantized_give_the_same_logits(tmp_path, monkeypatch):
    """The memory-lean mode (Pyodide) dequantizes big weights chunk by chunk at use."""
    monkeypatch.setattr(QuantizedWeight, "CHUNK_ROWS", 40)  # the 96-row head takes three chunks
    rng = np.random.default_rng(3)
    path = tmp_path / "llama.gguf"
    make_model(path, rng, Q.Q4_0, False, False)
    f = read_gguf(path)
    plan = build_plan(f.header)
    batch = Batch.for_sequence([3, 1, 4, 1, 5, 9, 2, 6], 0, all_logits=True)
    eager = CpuExecutor(plan, f.tensor_bytes).forward(batch)
    lean = CpuExecutor(plan, f.tensor_bytes, eager_limit=1024)
    assert any(not isinstance(w, np.ndarray) for w in lean.w.values())
    np.testing.assert_allclose(lean.forward(batch), eager, atol=1e-5)
