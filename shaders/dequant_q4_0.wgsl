// Q4_0: d f16 | qs[16]. Element j is the low nibble of byte j, element j+16 its high nibble;
// value = d * (q - 8).
const QK: u32 = 32u;
const BLOCK_BYTES: u32 = 18u;

fn dequant8(blk: u32, g: u32) -> Dq8 {
    let d = F(load_f16(blk));
    let at = blk + 2u + (g & 1u) * 8u;
    let shift = (g >> 1u) * 4u;
    let lo = vec4<F>(fields(load_u32(at), shift, 0xfu)) - 8.0;
    let hi = vec4<F>(fields(load_u32(at + 4u), shift, 0xfu)) - 8.0;
    return Dq8(d * lo, d * hi);
}
