// MXFP4: e u8 (E8M0 exponent) | qs[16], nibbles laid out as Q4_0, each an E2M1 code;
// value = 2^(e - 127) * E2M1[q] (the grid is stored doubled, the scale halved, as ggml does).
const QK: u32 = 32u;
const BLOCK_BYTES: u32 = 17u;

// E2M1 doubled: 0 1 2 3 4 6 8 12, then the same negated.
const MXFP4_GRID = vec4<u32>(0x03020100u, 0x0c080604u, 0xfdfeff00u, 0xf4f8fafcu);

fn dequant8(blk: u32, g: u32) -> Dq8 {
    let e = load_u8(blk);
    let d = F(bitcast<f32>(select((e - 1u) << 23u, 0x00200000u << e, e < 2u)));
    let at = blk + 1u + (g & 1u) * 8u;
    let shift = (g >> 1u) * 4u;
    let lo = lookup16(MXFP4_GRID, fields(load_u32(at), shift, 0xfu));
    let hi = lookup16(MXFP4_GRID, fields(load_u32(at + 4u), shift, 0xfu));
    return Dq8(d * lo, d * hi);
}
