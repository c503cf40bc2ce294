// IQ2_XS (2.31 bits per weight): d f16 | qs[32] u16 | scales[8]. Group g's u16 is a 9-bit
// iq2xs_grid row number and a 7-bit sign number (ksigns); 16 elements share a 4-bit scale, nibble
// (g / 2) % 2 of scales[g / 4]; value = d * (scale + 1/2) / 4 * ±grid.
const QK: u32 = 256u;
const BLOCK_BYTES: u32 = 74u;

fn dequant8(blk: u32, g: u32) -> Dq8 {
    let code = load_u16(blk + 2u + 2u * g);
    let scale = (load_u8(blk + 66u + (g >> 2u)) >> (4u * ((g >> 1u) & 1u))) & 0xfu;
    let dl = F(load_f16(blk) * (0.5 + f32(scale)) * 0.25);
    let row = 2u * (code & 511u);  // two words per grid row
    return signed8(dl, iq2xs_grid(row), iq2xs_grid(row + 1u), ksigns(code >> 9u));
}
