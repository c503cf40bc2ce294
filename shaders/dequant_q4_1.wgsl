// Q4_1: d f16 | m f16 | qs[16], nibbles laid out as Q4_0; value = d * q + m.
const QK: u32 = 32u;
const BLOCK_BYTES: u32 = 20u;

fn dequant8(blk: u32, g: u32) -> Dq8 {
    let d = F(load_f16(blk));
    let m = F(load_f16(blk + 2u));
    let at = blk + 4u + (g & 1u) * 8u;
    let shift = (g >> 1u) * 4u;
    let lo = vec4<F>(fields(load_u32(at), shift, 0xfu));
    let hi = vec4<F>(fields(load_u32(at + 4u), shift, 0xfu));
    return Dq8(d * lo + m, d * hi + m);
}
