// IQ4_NL: d f16 | qs[16], nibbles laid out as Q4_0; value = d * IQ4_GRID[q].
const QK: u32 = 32u;
const BLOCK_BYTES: u32 = 18u;

fn dequant8(blk: u32, g: u32) -> Dq8 {
    let d = F(load_f16(blk));
    let at = blk + 2u + (g & 1u) * 8u;
    let shift = (g >> 1u) * 4u;
    let lo = lookup16(IQ4_GRID, fields(load_u32(at), shift, 0xfu));
    let hi = lookup16(IQ4_GRID, fields(load_u32(at + 4u), shift, 0xfu));
    return Dq8(d * lo, d * hi);
}
