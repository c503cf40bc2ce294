// NVFP4: d[4] (UE4M3 scales, one per 16 elements) | qs[32]. Sub-block s = g / 2 holds qs[8s ..
// 8s+7], elements 0..7 in the low nibbles and 8..15 in the high ones, each an E2M1 code;
// value = UE4M3(d[s]) * E2M1[q] (the grid is stored doubled, the scale halved, as ggml does).
const QK: u32 = 64u;
const BLOCK_BYTES: u32 = 36u;

// Unsigned E4M3 (exponent bias 7, bit 7 unused), halved; 0x7F (its NaN) reads as 0, as in ggml.
fn ue4m3_half(x: u32) -> f32 {
    let e = (x >> 3u) & 0xfu;
    let m = x & 7u;
    // normal: (8 + m) * 2^(e - 11) = (1 + m / 8) * 2^(e - 7) / 2; subnormal (e = 0): m * 2^-10
    let v = ldexp(f32(select(m | 8u, m, e == 0u)), i32(max(e, 1u)) - 11);
    return select(v, 0.0, x == 0x7fu);
}

fn dequant8(blk: u32, g: u32) -> Dq8 {
    let s = g >> 1u;
    let d = F(ue4m3_half((w[blk >> 2u] >> (8u * s)) & 0xffu));  // 36-byte blocks stay word-aligned
    let i = (blk >> 2u) + 1u + 2u * s;
    let shift = 4u * (g & 1u);
    return Dq8(d * lookup16(E2M1_GRID, fields(w[i], shift, 0xfu)), d * lookup16(E2M1_GRID, fields(w[i + 1u], shift, 0xfu)));
}
