// Q6_K: ql[128] | qh[64] | scales[16] int8 | d f16. Element n*128 + 32k + l (k = 0..3): low 4 bits
// from ql[64n + 32(k % 2) + l] (nibble k / 2), top 2 bits = bit pair k of qh[32n + l];
// sub-block 8n + 2k + l/16; value = d * scale * (q - 32).
const QK: u32 = 256u;
const BLOCK_BYTES: u32 = 210u;

fn dequant8(blk: u32, g: u32) -> Dq8 {
    let n = g >> 4u;
    let k = (g >> 2u) & 3u;
    let l = (g & 3u) * 8u;
    let dl = F(load_f16(blk + 208u) * f32(load_i8(blk + 192u + 8u * n + 2u * k + (l >> 4u))));
    let ql = blk + 64u * n + 32u * (k & 1u) + l;
    let qh = blk + 128u + 32u * n + l;
    let lo = fields(load_u32(ql), 4u * (k >> 1u), 0xfu) | (fields(load_u32(qh), 2u * k, 3u) << vec4<u32>(4u));
    let hi = fields(load_u32(ql + 4u), 4u * (k >> 1u), 0xfu) | (fields(load_u32(qh + 4u), 2u * k, 3u) << vec4<u32>(4u));
    return Dq8(dl * (vec4<F>(lo) - 32.0), dl * (vec4<F>(hi) - 32.0));
}
