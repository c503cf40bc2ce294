// Q8_K: d f32 | qs[256] int8 | bsums[16] i16 (unused here); value = d * q.
const QK: u32 = 256u;
const BLOCK_BYTES: u32 = 292u;

fn dequant8(blk: u32, g: u32) -> Dq8 {
    let d = F(bitcast<f32>(w[blk >> 2u]));
    let i = (blk + 4u + 8u * g) >> 2u;
    return Dq8(d * vec4<F>(bytes_i8(w[i])), d * vec4<F>(bytes_i8(w[i + 1u])));
}
