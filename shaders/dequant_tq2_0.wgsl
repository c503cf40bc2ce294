// TQ2_0 (ternary): qs[64] | d f16. Element n*128 + j*32 + l is bit pair j of qs[32n + l];
// value = d * (q - 1).
const QK: u32 = 256u;
const BLOCK_BYTES: u32 = 66u;

fn dequant8(blk: u32, g: u32) -> Dq8 {
    let d = F(load_f16(blk + 64u));
    let j = (g >> 2u) & 3u;
    let at = blk + 32u * (g >> 4u) + (g & 3u) * 8u;
    let lo = vec4<F>(fields(load_u32(at), 2u * j, 3u)) - 1.0;
    let hi = vec4<F>(fields(load_u32(at + 4u), 2u * j, 3u)) - 1.0;
    return Dq8(d * lo, d * hi);
}
