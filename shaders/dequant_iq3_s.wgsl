// IQ3_S (3.44 bits per weight): d f16 | qs[64] | qh[8] | signs[32] | scales[4]. Grid row i (4
// elements) is iq3s_grid row qs[i], topped by bit i % 8 of qh[i / 8] (9 bits); group g = rows 2g and
// 2g + 1 with sign bits signs[g]; 32 elements share a 4-bit scale, nibble (g / 4) % 2 of
// scales[g / 8]; value = d * (1 + 2 * scale) * ±grid.
const QK: u32 = 256u;
const BLOCK_BYTES: u32 = 110u;

fn dequant8(blk: u32, g: u32) -> Dq8 {
    let qs = load_u16(blk + 2u + 2u * g);
    let qh = load_u8(blk + 66u + (g >> 2u)) >> (2u * (g & 3u));  // bit 0: row 2g, bit 1: row 2g + 1
    let row0 = (qs & 0xffu) | ((qh & 1u) << 8u);
    let row1 = (qs >> 8u) | ((qh & 2u) << 7u);
    let scale = (load_u8(blk + 106u + (g >> 3u)) >> (4u * ((g >> 2u) & 1u))) & 0xfu;
    let dl = F(load_f16(blk) * f32(1u + 2u * scale));
    return signed8(dl, iq3s_grid(row0), iq3s_grid(row1), load_u8(blk + 74u + g));
}
