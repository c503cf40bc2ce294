// IQ1_M (1.75 bits per weight): qs[32] | qh[16] | scales[8] (four u16). Group g's nibble, g % 2 of
// qh[g / 2]: 3 bits top the iq1s_grid row qs[g] (11 bits), bit 3 is the sign of the grid's shift
// delta = ±1/8. 16 elements share a 3-bit scale, bits 3 * ((g / 2) % 4) of u16 g / 8; the block's
// f16 d is spread over the top nibbles of the four u16s; value = d * (2 * scale + 1) * (grid + delta).
const QK: u32 = 256u;
const BLOCK_BYTES: u32 = 56u;

fn dequant8(blk: u32, g: u32) -> Dq8 {
    let sc = vec2<u32>(w[(blk + 48u) >> 2u], w[(blk + 52u) >> 2u]);  // 56-byte blocks stay word-aligned
    let d_bits = ((sc.x >> 12u) & 0xfu) | ((sc.x >> 24u) & 0xf0u) | ((sc.y >> 4u) & 0xf00u) | ((sc.y >> 16u) & 0xf000u);
    let scale = (load_u16(blk + 48u + 2u * (g >> 3u)) >> (3u * ((g >> 1u) & 3u))) & 7u;
    let dl = F(unpack2x16float(d_bits).x * f32(2u * scale + 1u));
    let nibble = (load_u8(blk + 32u + (g >> 1u)) >> (4u * (g & 1u))) & 0xfu;
    let row = load_u8(blk + g) | ((nibble & 7u) << 8u);
    return iq1_values(dl, iq1s_grid(row), select(0.125, -0.125, nibble >= 8u));
}
