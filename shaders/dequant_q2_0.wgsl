// Q2_0 (2 bits per weight): d f16 | qs[16]. Element j is bit pair j % 4 of qs[j / 4];
// value = d * (q - 1): -d, 0, d or 2d.
const QK: u32 = 64u;
const BLOCK_BYTES: u32 = 18u;

fn dequant8(blk: u32, g: u32) -> Dq8 {
    let d = F(load_f16(blk));
    let codes = vec4<u32>(load_u16(blk + 2u + 2u * g));  // elements 8g .. 8g+7
    let lo = vec4<F>((codes >> vec4<u32>(0u, 2u, 4u, 6u)) & vec4<u32>(3u)) - 1.0;
    let hi = vec4<F>((codes >> vec4<u32>(8u, 10u, 12u, 14u)) & vec4<u32>(3u)) - 1.0;
    return Dq8(d * lo, d * hi);
}
