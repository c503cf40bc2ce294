// Q3_K: hmask[32] | qs[64] | scales[12] | d f16. Element n*128 + j*32 + l: low bits = bit pair j
// of qs[32n + l], and 4 is subtracted unless bit 4n + j of hmask[l] is set. Sub-block
// is = 8n + 2j + l/16 has a 6-bit scale: its low nibble in scales[is % 8] (nibble is / 8), its
// top two bits in scales[8 + is % 4] (pair is / 4); value = d * (scale - 32) * q.
const QK: u32 = 256u;
const BLOCK_BYTES: u32 = 110u;

// Four elements from a qs word (bit pair j) and the matching hmask word (bit `hbit`).
fn q3_k_quad(qs: u32, hmask: u32, j: u32, hbit: u32) -> vec4<F> {
    return vec4<F>(vec4<i32>(fields(qs, 2u * j, 3u)) + 4 * vec4<i32>(fields(hmask, hbit, 1u)) - 4);
}

fn dequant8(blk: u32, g: u32) -> Dq8 {
    let n = g >> 4u;
    let j = (g >> 2u) & 3u;
    let l = (g & 3u) * 8u;
    let is = 8u * n + 2u * j + (l >> 4u);
    let low = (load_u8(blk + 96u + (is & 7u)) >> (4u * (is >> 3u))) & 0xfu;
    let high = (load_u8(blk + 104u + (is & 3u)) >> (2u * (is >> 2u))) & 3u;
    let dl = F(load_f16(blk + 108u) * (f32(low | (high << 4u)) - 32.0));
    let qs = blk + 32u + 32u * n + l;
    let hbit = 4u * n + j;
    let lo = q3_k_quad(load_u32(qs), load_u32(blk + l), j, hbit);
    let hi = q3_k_quad(load_u32(qs + 4u), load_u32(blk + l + 4u), j, hbit);
    return Dq8(dl * lo, dl * hi);
}
