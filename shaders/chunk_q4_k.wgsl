// Q4_K in 16-byte chunks (matvec_chunks.wgsl, over blocks_vec4.wgsl): a block is its header (d, dmin,
// 12 scale bytes) and eight chunks of qs. Chunk c = qs[16c .. 16c + 16] (j = c / 2, p = c % 2): low
// nibbles are elements 64j + 16p + (0..15) of sub-block 2j, high nibbles the same 32 later, of 2j + 1.
const QK: u32 = 256u;
const BLOCK_BYTES: u32 = 144u;
const CHUNKS: u32 = 8u;

fn chunk_x(c: u32) -> vec2<u32> {
    let first = 64u * (c >> 1u) + 16u * (c & 1u);
    return vec2<u32>(first, first + 32u);
}

struct Chunk {
    head: vec4<u32>,
    qs: vec4<u32>,
}

fn chunk_load(row: u32, b: u32, c: u32) -> Chunk {
    let at = (row + b * BLOCK_BYTES) >> 4u;
    return Chunk(w4[at], w4[at + 1u + c]);
}

fn chunk_dot(q: Chunk, row: u32, b: u32, c: u32, xc: XChunk) -> f32 {
    return k4_chunk_dot(q.head, c >> 1u, q.qs & LOW_NIBBLES, (q.qs >> vec4<u32>(4u)) & LOW_NIBBLES, xc);
}
