// IQ2_S (2.5 bits per weight): d f16 | qs[32] | signs[32] | qh[8] | scales[8]. Group g: iq2s_grid
// row qs[g], topped by bit pair g % 4 of qh[g / 4] (10 bits); its sign bits are signs[g]; scales as
// IQ2_XS; value = d * (scale + 1/2) / 4 * ±grid.
const QK: u32 = 256u;
const BLOCK_BYTES: u32 = 82u;

fn dequant8(blk: u32, g: u32) -> Dq8 {
    let high = (load_u8(blk + 66u + (g >> 2u)) >> (2u * (g & 3u))) & 3u;
    let row = 2u * (load_u8(blk + 2u + g) | (high << 8u));  // two words per grid row
    let scale = (load_u8(blk + 74u + (g >> 2u)) >> (4u * ((g >> 1u) & 1u))) & 0xfu;
    let dl = F(load_f16(blk) * (0.5 + f32(scale)) * 0.25);
    return signed8(dl, iq2s_grid(row), iq2s_grid(row + 1u), load_u8(blk + 34u + g));
}
