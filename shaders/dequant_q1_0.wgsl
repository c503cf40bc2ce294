// Q1_0 (1 bit per weight): d f16 | qs[16]. Element j is bit j % 8 of qs[j / 8]; value = +d where
// it is set, -d where it is clear.
const QK: u32 = 128u;
const BLOCK_BYTES: u32 = 18u;

fn dequant8(blk: u32, g: u32) -> Dq8 {
    let d = F(load_f16(blk));
    let bits = vec4<u32>(load_u8(blk + 2u + g));
    let lo = vec4<F>((bits >> vec4<u32>(0u, 1u, 2u, 3u)) & vec4<u32>(1u));
    let hi = vec4<F>((bits >> vec4<u32>(4u, 5u, 6u, 7u)) & vec4<u32>(1u));
    return Dq8(d * (2.0 * lo - 1.0), d * (2.0 * hi - 1.0));
}
