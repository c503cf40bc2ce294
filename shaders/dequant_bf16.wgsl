// BF16: the top half of an f32, so a shift recovers it exactly.
const QK: u32 = 8u;
const BLOCK_BYTES: u32 = 16u;

fn bf16_pairs(word0: u32, word1: u32) -> vec4<F> {
    let words = vec4<u32>(word0, word0, word1, word1);
    return vec4<F>(bitcast<vec4<f32>>((words << vec4<u32>(16u, 0u, 16u, 0u)) & vec4<u32>(0xffff0000u)));
}

fn dequant8(blk: u32, g: u32) -> Dq8 {
    let i = blk >> 2u;
    return Dq8(bf16_pairs(w[i], w[i + 1u]), bf16_pairs(w[i + 2u], w[i + 3u]));
}
