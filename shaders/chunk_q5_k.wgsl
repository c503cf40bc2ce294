// Q5_K in 16-byte chunks (matvec_chunks.wgsl, over blocks_vec4.wgsl): header (d, dmin, 12 scale
// bytes) | qh[32] | qs[128]. Chunk c covers the elements of Q4_K's chunk c (j = c / 2, p = c % 2);
// their fifth bits are bits 2j (low nibbles) and 2j + 1 (high nibbles) of qh[16p .. 16p + 16].
const QK: u32 = 256u;
const BLOCK_BYTES: u32 = 176u;
const CHUNKS: u32 = 8u;

fn chunk_x(c: u32) -> vec2<u32> {
    let first = 64u * (c >> 1u) + 16u * (c & 1u);
    return vec2<u32>(first, first + 32u);
}

struct Chunk {
    head: vec4<u32>,
    qh: vec4<u32>,
    qs: vec4<u32>,
}

fn chunk_load(row: u32, b: u32, c: u32) -> Chunk {
    let at = (row + b * BLOCK_BYTES) >> 4u;
    return Chunk(w4[at], w4[at + 1u + (c & 1u)], w4[at + 3u + c]);
}

fn chunk_dot(q: Chunk, row: u32, b: u32, c: u32, xc: XChunk) -> f32 {
    let j = c >> 1u;
    let fifth = vec4<u32>(0x01010101u);
    let qa = (q.qs & LOW_NIBBLES) | (((q.qh >> vec4<u32>(2u * j)) & fifth) << vec4<u32>(4u));
    let qb = ((q.qs >> vec4<u32>(4u)) & LOW_NIBBLES) | (((q.qh >> vec4<u32>(2u * j + 1u)) & fifth) << vec4<u32>(4u));
    return k4_chunk_dot(q.head, j, qa, qb, xc);
}
