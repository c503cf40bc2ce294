// IQ4_XS: d f16 | scales_h u16 | scales_l[4] | qs[128]. Sub-block ib (32 elements) = qs[16ib ..
// 16ib+16] with nibbles laid out as Q4_0; its 6-bit scale is nibble ib % 2 of scales_l[ib / 2]
// plus bit pair ib of scales_h on top; value = d * (scale - 32) * IQ4_GRID[q].
const QK: u32 = 256u;
const BLOCK_BYTES: u32 = 136u;

fn dequant8(blk: u32, g: u32) -> Dq8 {
    let ib = g >> 2u;
    let low = (load_u8(blk + 4u + (ib >> 1u)) >> (4u * (ib & 1u))) & 0xfu;
    let high = (load_u16(blk + 2u) >> (2u * ib)) & 3u;
    let dl = F(load_f16(blk) * (f32(low | (high << 4u)) - 32.0));
    let i = (blk + 8u + 16u * ib + (g & 1u) * 8u) >> 2u;
    let shift = ((g >> 1u) & 1u) * 4u;
    let lo = lookup16(IQ4_GRID, fields(w[i], shift, 0xfu));
    let hi = lookup16(IQ4_GRID, fields(w[i + 1u], shift, 0xfu));
    return Dq8(dl * lo, dl * hi);
}
