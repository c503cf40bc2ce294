// F32: plain floats, taken 8 at a time (a row is K*4 bytes, so groups are word-aligned).
const QK: u32 = 8u;
const BLOCK_BYTES: u32 = 32u;

fn dequant8(blk: u32, g: u32) -> Dq8 {
    let i = blk >> 2u;
    let lo = vec4<u32>(w[i], w[i + 1u], w[i + 2u], w[i + 3u]);
    let hi = vec4<u32>(w[i + 4u], w[i + 5u], w[i + 6u], w[i + 7u]);
    return Dq8(vec4<F>(bitcast<vec4<f32>>(lo)), vec4<F>(bitcast<vec4<f32>>(hi)));
}
