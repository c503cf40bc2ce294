// Q5_0: d f16 | qh u32 | qs[16]. Low 4 bits as Q4_0, bit e of qh is element e's fifth bit;
// value = d * (q - 16).
const QK: u32 = 32u;
const BLOCK_BYTES: u32 = 22u;

fn dequant8(blk: u32, g: u32) -> Dq8 {
    let d = F(load_f16(blk));
    let qh = load_u32(blk + 2u);
    let at = blk + 6u + (g & 1u) * 8u;
    let shift = (g >> 1u) * 4u;
    let lo = fields(load_u32(at), shift, 0xfu) | fifth_bits(qh, 8u * g);
    let hi = fields(load_u32(at + 4u), shift, 0xfu) | fifth_bits(qh, 8u * g + 4u);
    return Dq8(d * (vec4<F>(lo) - 16.0), d * (vec4<F>(hi) - 16.0));
}
