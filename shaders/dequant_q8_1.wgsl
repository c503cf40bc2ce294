// Q8_1 (ggml's 36-byte block): d f16 | s f16 (= d * sum(q), unused here) | qs[32] int8; value = d * q.
const QK: u32 = 32u;
const BLOCK_BYTES: u32 = 36u;

fn dequant8(blk: u32, g: u32) -> Dq8 {
    let d = F(load_f16(blk));
    let at = blk + 4u + 8u * g;
    return Dq8(d * vec4<F>(bytes_i8(w[at >> 2u])), d * vec4<F>(bytes_i8(w[(at >> 2u) + 1u])));
}
