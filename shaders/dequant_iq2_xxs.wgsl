// IQ2_XXS (2.06 bits per weight): d f16 | qs[64]. Elements 32ib .. 32ib+31 (ib = g / 4) own the 8
// bytes at 2 + 8ib: four iq2xxs_grid row numbers (8 elements each), then a u32 holding four 7-bit
// sign numbers (ksigns, bits 7l ..) and a 4-bit scale (bits 28..31);
// value = d * (scale + 1/2) / 4 * ±grid.
const QK: u32 = 256u;
const BLOCK_BYTES: u32 = 66u;

fn dequant8(blk: u32, g: u32) -> Dq8 {
    let at = blk + 2u + 8u * (g >> 2u);
    let aux = load_u32(at + 4u);
    let dl = F(load_f16(blk) * (0.5 + f32(aux >> 28u)) * 0.25);
    let row = 2u * load_u8(at + (g & 3u));  // two words per grid row
    let signs = ksigns((aux >> (7u * (g & 3u))) & 127u);
    return signed8(dl, iq2xxs_grid(row), iq2xxs_grid(row + 1u), signs);
}
