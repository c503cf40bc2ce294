"""Write a synthetic llama-architecture GGUF of a real model's shape, for speed measurements.

    python bench/make_synthetic_gguf.py OUT.gguf [--shape 7b] [--seed 0]

The default shape is a 7B llama (32 layers, 4096 wide, FFN 14336, 32 query / 8 KV heads, a
32,000-token vocabulary) with llama.cpp's Q4_K_M type mix (Q4_K, with attn_v and ffn_down in Q6_K,
the output head Q6_K): ~4.1 GB, larger than wasm32's 4 GiB, where the weights, not the per-step
latency, decide decode speed. Weights are random blocks with small, valid f16 scales (the text
is noise, the work per token is a real model's); the tokenizer is a valid SentencePiece-style
vocabulary (byte tokens, then random pieces). Never shipped: made where it is measured.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import gguf
import numpy as np

Q = gguf.GGMLQuantizationType
SHAPES = {  # layers, width, FFN, heads, KV heads, vocab
    "7b": (32, 4096, 14336, 32, 8, 32000),
    "1b": (16, 2048, 8192, 32, 8, 32000),
    "tiny": (2, 256, 512, 4, 2, 1024),
}
BLOCK = {Q.Q4_K: (256, 144), Q.Q6_K: (256, 210)}


def blocks(rng: np.random.Generator, qtype: Q, rows: int, cols: int) -> np.ndarray:
    """Random blocks of `qtype` with small positive f16 scales, as the uint8 array the file holds."""
    per, size = BLOCK[qtype]
    data = rng.integers(0, 256, (rows * cols // per, size), dtype=np.uint8)
    if qtype == Q.Q4_K:  # d, dmin f16 first, then 12 bytes of 6-bit scales and mins
        data[:, 0:4] = np.frombuffer(np.array([0.004, 0.002], np.float16).tobytes(), np.uint8)
        data[:, 4:16] &= 0x0F
    else:  # Q6_K: ql, qh, 16 int8 scales, d f16 last
        data[:, 192:208] = rng.integers(1, 16, (len(data), 16), dtype=np.uint8)
        data[:, 208:210] = np.frombuffer(np.array([0.002], np.float16).tobytes(), np.uint8)
    return data.reshape(rows, cols // per * size)


def vocabulary(rng: np.random.Generator, n: int) -> list[str]:
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    seen = set(tokens)
    while len(tokens) < n:
        piece = "\u2581" * int(rng.integers(0, 2)) + "".join(rng.choice(letters, int(rng.integers(1, 8))))
        if piece not in seen:
            seen.add(piece)
            tokens.append(piece)
    return tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--shape", choices=SHAPES, default="7b")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    n_layers, d, ffn, n_heads, n_kv, vocab = SHAPES[args.shape]
    hd = d // n_heads
    rng = np.random.default_rng(args.seed)
    w = gguf.GGUFWriter(str(args.out), "llama")
    w.add_name(f"synthetic llama {args.shape} (random weights)")
    w.add_context_length(4096)
    w.add_embedding_length(d)
    w.add_block_count(n_layers)
    w.add_feed_forward_length(ffn)
    w.add_head_count(n_heads)
    w.add_head_count_kv(n_kv)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(500000.0)
    w.add_tokenizer_model("llama")
    tokens = vocabulary(rng, vocab)
    w.add_token_list(tokens)
    w.add_token_scores([-float(i) for i in range(vocab)])
    w.add_token_types([2, 3, 3] + [6] * 256 + [1] * (vocab - 259))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)

    # (name, rows, cols, type): numpy order, rows x row length
    tensors = [("token_embd.weight", vocab, d, Q.Q4_K), ("output_norm.weight", d, 0, Q.F32),
               ("output.weight", vocab, d, Q.Q6_K)]
    for i in range(n_layers):
        p = f"blk.{i}."
        tensors += [(p + "attn_norm.weight", d, 0, Q.F32), (p + "ffn_norm.weight", d, 0, Q.F32),
                    (p + "attn_q.weight", n_heads * hd, d, Q.Q4_K), (p + "attn_k.weight", n_kv * hd, d, Q.Q4_K),
                    (p + "attn_v.weight", n_kv * hd, d, Q.Q6_K), (p + "attn_output.weight", d, n_heads * hd, Q.Q4_K),
                    (p + "ffn_gate.weight", ffn, d, Q.Q4_K), (p + "ffn_up.weight", ffn, d, Q.Q4_K),
                    (p + "ffn_down.weight", d, ffn, Q.Q6_K)]
    for name, rows, cols, qtype in tensors:
        if qtype == Q.F32:
            w.add_tensor_info(name, (rows,), np.dtype(np.float32), 4 * rows)
        else:
            per, size = BLOCK[qtype]
            w.add_tensor_info(name, (rows, cols // per * size), np.dtype(np.uint8), rows * cols // per * size,
                              raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for _, rows, cols, qtype in tensors:  # streamed: never the whole model in memory
        w.write_tensor_data(np.ones(rows, np.float32) if qtype == Q.F32 else blocks(rng, qtype, rows, cols))
    w.close()
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e9:.2f} GB): {args.shape}, {len(tensors)} tensors")


if __name__ == "__main__":
    main()
