// F16: IEEE halves, 8 per group (a row is K*2 bytes with K a multiple of 8: word-aligned).
const QK: u32 = 8u;
const BLOCK_BYTES: u32 = 16u;

fn dequant8(blk: u32, g: u32) -> Dq8 {
    let i = blk >> 2u;
    let lo = vec4<F>(vec4<f32>(unpack2x16float(w[i]), unpack2x16float(w[i + 1u])));
    let hi = vec4<F>(vec4<f32>(unpack2x16float(w[i + 2u]), unpack2x16float(w[i + 3u])));
    return Dq8(lo, hi);
}
