// Q2_K: scales[16] | qs[64] | d f16 | dmin f16. Element n*128 + j*32 + l is bit pair j of
// qs[32n + l]; its sub-block 8n + 2j + l/16 has scale byte (min << 4 | scale);
// value = d * scale * q - dmin * min.
const QK: u32 = 256u;
const BLOCK_BYTES: u32 = 84u;

fn dequant8(blk: u32, g: u32) -> Dq8 {
    let n = g >> 4u;
    let j = (g >> 2u) & 3u;
    let l = (g & 3u) * 8u;
    let sc = load_u8(blk + 8u * n + 2u * j + (l >> 4u));
    let dl = F(load_f16(blk + 80u) * f32(sc & 0xfu));
    let ml = F(load_f16(blk + 82u) * f32(sc >> 4u));
    let at = blk + 16u + 32u * n + l;
    let lo = vec4<F>(fields(w[at >> 2u], 2u * j, 3u));
    let hi = vec4<F>(fields(w[(at >> 2u) + 1u], 2u * j, 3u));
    return Dq8(dl * lo - ml, dl * hi - ml);
}
