// Q5_0 as chunks (matvec_chunks.wgsl, over blocks.wgsl and words16.wgsl): d f16 | qh u32 | qs[16],
// the whole block one chunk (a lane a block). Low nibbles of qs are elements 0..15 (the first
// piece), high nibbles 16..31; bit e of qh is element e's fifth bit; value = d * (q - 16).
const QK: u32 = 32u;
const BLOCK_BYTES: u32 = 22u;
const CHUNKS: u32 = 1u;

fn chunk_x(c: u32) -> vec2<u32> {
    return vec2<u32>(0u, 16u);
}

struct Chunk {
    qs: Words16,
    qh: vec2<u32>,  // the words holding qh (from the one holding its first byte)
    d: u32,  // the word holding d
}

fn chunk_load(row: u32, b: u32, c: u32) -> Chunk {
    let blk = row + b * BLOCK_BYTES;
    let h = (blk + 2u) >> 2u;
    return Chunk(load16(blk + 6u), vec2<u32>(w[h], w[h + 1u]), w[blk >> 2u]);
}

// Bits 0..3 of each of four values, moved to bit 4 of the four bytes of a word.
fn fifth_bytes(v: vec4<u32>) -> vec4<u32> {
    let one = vec4<u32>(1u);
    let bits = ((v & one) | ((v & vec4<u32>(2u)) << vec4<u32>(7u))) | (((v & vec4<u32>(4u)) << vec4<u32>(14u))
        | ((v & vec4<u32>(8u)) << vec4<u32>(21u)));
    return bits << vec4<u32>(4u);
}

fn chunk_dot(q: Chunk, row: u32, b: u32, c: u32, xc: XChunk) -> f32 {
    let blk = row + b * BLOCK_BYTES;
    let qs = bytes16(q.qs, ((blk + 6u) & 3u) * 8u);
    let s = ((blk + 2u) & 3u) * 8u;
    let qh = select((q.qh.x >> s) | (q.qh.y << (32u - s)), q.qh.x, s == 0u);
    let nibbles = vec4<u32>(0x0f0f0f0fu);
    let qa = (qs & nibbles) | fifth_bytes(vec4<u32>(qh) >> vec4<u32>(0u, 4u, 8u, 12u));
    let qb = ((qs >> vec4<u32>(4u)) & nibbles) | fifth_bytes(vec4<u32>(qh) >> vec4<u32>(16u, 20u, 24u, 28u));
    let dots = xc.d * vec2<f32>(f32(dot16(qa, xc.a)), f32(dot16(qb, xc.b))) - 16.0 * xc.s;
    return unpack2x16float(q.d >> ((blk & 2u) * 8u)).x * (dots.x + dots.y);
}
