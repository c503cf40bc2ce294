// Q5_K: d f16 | dmin f16 | scales[12] | qh[32] | qs[128]. Nibbles and scales as Q4_K; the fifth bit
// of element 64j + 32h + l is bit 2j + h of qh[l]; value = d * scale * q - dmin * min.
const QK: u32 = 256u;
const BLOCK_BYTES: u32 = 176u;

fn dequant8(blk: u32, g: u32) -> Dq8 {
    let j = g >> 3u;
    let half = (g >> 2u) & 1u;
    let l = (g & 3u) * 8u;
    let dm = k4_scale_min(blk, 2u * j + half);
    let dl = dm.x;
    let ml = dm.y;
    let qh = (blk + 16u + l) >> 2u;
    let qs = (blk + 48u + 32u * j + l) >> 2u;
    let bit = 2u * j + half;
    let lo = fields(w[qs], 4u * half, 0xfu) | (fields(w[qh], bit, 1u) << vec4<u32>(4u));
    let hi = fields(w[qs + 1u], 4u * half, 0xfu) | (fields(w[qh + 1u], bit, 1u) << vec4<u32>(4u));
    return Dq8(dl * vec4<F>(lo) - ml, dl * vec4<F>(hi) - ml);
}
