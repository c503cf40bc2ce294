// IQ1_S (1.56 bits per weight): d f16 | qs[32] | qh[8] u16. Elements 32ib .. 32ib+31 (ib = g / 4)
// share qh[ib]: its bits 3l .. 3l+2 (l = g % 4) top the iq1s_grid row qs[g] (11 bits), bits 12..14
// are a 3-bit scale and bit 15 the sign of the grid's shift delta = ±1/8;
// value = d * (2 * scale + 1) * (grid + delta).
const QK: u32 = 256u;
const BLOCK_BYTES: u32 = 50u;

fn dequant8(blk: u32, g: u32) -> Dq8 {
    let qh = load_u16(blk + 34u + 2u * (g >> 2u));
    let row = load_u8(blk + 2u + g) | (((qh >> (3u * (g & 3u))) & 7u) << 8u);
    let dl = F(load_f16(blk) * f32(2u * ((qh >> 12u) & 7u) + 1u));
    return iq1_values(dl, iq1s_grid(row), select(0.125, -0.125, qh >= 0x8000u));
}
