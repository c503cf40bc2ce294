// Q5_1: d f16 | m f16 | qh u32 | qs[16], bits laid out as Q5_0; value = d * q + m.
const QK: u32 = 32u;
const BLOCK_BYTES: u32 = 24u;

fn dequant8(blk: u32, g: u32) -> Dq8 {
    let d = F(load_f16(blk));
    let m = F(load_f16(blk + 2u));
    let qh = load_u32(blk + 4u);
    let at = blk + 8u + (g & 1u) * 8u;
    let shift = (g >> 1u) * 4u;
    let lo = fields(load_u32(at), shift, 0xfu) | fifth_bits(qh, 8u * g);
    let hi = fields(load_u32(at + 4u), shift, 0xfu) | fifth_bits(qh, 8u * g + 4u);
    return Dq8(d * vec4<F>(lo) + m, d * vec4<F>(hi) + m);
}
