// MXFP4: e u8 (E8M0 exponent) | qs[16], nibbles laid out as Q4_0, each an E2M1 code;
// value = 2^(e - 127) * E2M1[q] (the grid is stored doubled, the scale halved, as ggml does).
const QK: u32 = 32u;
const BLOCK_BYTES: u32 = 17u;

fn dequant8(blk: u32, g: u32) -> Dq8 {
    let e = load_u8(blk);
    let d = F(bitcast<f32>(select((e - 1u) << 23u, 0x00200000u << e, e < 2u)));
    let at = blk + 1u + (g & 1u) * 8u;
    let shift = (g >> 1u) * 4u;
    let lo = lookup16(E2M1_GRID, fields(load_u32(at), shift, 0xfu));
    let hi = lookup16(E2M1_GRID, fields(load_u32(at + 4u), shift, 0xfu));
    return Dq8(d * lo, d * hi);
}
