// TQ1_0 (ternary, 1.6 bits): qs[48] | qh[4] | d f16. Each byte packs up to five base-3 digits as a
// fixed-point fraction: digit p of byte b is (((b * 3^p) mod 256) * 3) >> 8. Elements 0..159 take
// digit e / 32 of qs[e % 32], 160..239 digit (e - 160) / 16 of qs[32 + e % 16], 240..255 digit
// (e - 240) / 4 of qh[e % 4]; value = d * (digit - 1).
const QK: u32 = 256u;
const BLOCK_BYTES: u32 = 54u;

const POW3 = vec4<u32>(1u, 3u, 9u, 27u);

// Four consecutive elements starting at e (a multiple of 4).
fn tq1_0_quad(blk: u32, e: u32) -> vec4<F> {
    let in_qs1 = e >= 160u;
    let in_qh = e >= 240u;
    let p = select(select(e / 32u, (e - 160u) / 16u, in_qs1), (e - 240u) / 4u, in_qh);
    let at = select(select(e % 32u, 32u + e % 16u, in_qs1), 48u, in_qh);
    let pow3 = select(POW3[p & 3u], 81u, p == 4u);
    let b = fields(load_u32(blk + at), 0u, 0xffu);
    let digits = (((b * pow3) & vec4<u32>(0xffu)) * 3u) >> vec4<u32>(8u);
    return vec4<F>(digits) - 1.0;
}

fn dequant8(blk: u32, g: u32) -> Dq8 {
    let d = F(load_f16(blk + 52u));
    return Dq8(d * tq1_0_quad(blk, 8u * g), d * tq1_0_quad(blk, 8u * g + 4u));
}
