// IQ3_XXS (3.06 bits per weight): d f16 | qs[64] | scales_and_signs[32]. Group g = two iq3xxs_grid
// rows of 4 elements, qs[2g] and qs[2g + 1]; elements 32ib .. 32ib+31 (ib = g / 4) share the u32 at
// 66 + 4ib: four 7-bit sign numbers (ksigns, bits 7l ..) and a 4-bit scale (bits 28..31);
// value = d * (scale + 1/2) / 2 * ±grid.
const QK: u32 = 256u;
const BLOCK_BYTES: u32 = 98u;

fn dequant8(blk: u32, g: u32) -> Dq8 {
    let aux = load_u32(blk + 66u + 4u * (g >> 2u));
    let dl = F(load_f16(blk) * (0.5 + f32(aux >> 28u)) * 0.5);
    let rows = load_u16(blk + 2u + 2u * g);
    let signs = ksigns((aux >> (7u * (g & 3u))) & 127u);
    return signed8(dl, iq3xxs_grid(rows & 0xffu), iq3xxs_grid(rows >> 8u), signs);
}
