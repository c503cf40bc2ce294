// Q4_K: d f16 | dmin f16 | scales[12] | qs[128]. Chunk j (64 elements) = qs[32j .. 32j+32]: low
// nibbles are sub-block 2j, high nibbles sub-block 2j+1; value = d * scale * q - dmin * min.
const QK: u32 = 256u;
const BLOCK_BYTES: u32 = 144u;

fn dequant8(blk: u32, g: u32) -> Dq8 {
    let j = g >> 3u;
    let half = (g >> 2u) & 1u;
    let l = (g & 3u) * 8u;
    let dm = k4_scale_min(blk, 2u * j + half);
    let dl = dm.x;
    let ml = dm.y;
    let i = (blk + 16u + 32u * j + l) >> 2u;
    let lo = vec4<F>(fields(w[i], 4u * half, 0xfu));
    let hi = vec4<F>(fields(w[i + 1u], 4u * half, 0xfu));
    return Dq8(dl * lo - ml, dl * hi - ml);
}
