// Q6_K in 16-byte chunks (matvec_chunks.wgsl, over blocks.wgsl and words16.wgsl: 210-byte blocks
// start at any even byte): ql[128] | qh[64] | scales[16] int8 | d f16.
// Chunk c = 4n + 2m + p is ql[16c .. 16c + 16] and qh[32n + 16p .. + 16]: low nibbles with bit pair
// m of qh are elements 128n + 32m + 16p + (0..15) (scale 8n + 2m + p), high nibbles with bit pair
// m + 2 the same 64 later (scale + 4); value = d * scale * (q - 32).
const QK: u32 = 256u;
const BLOCK_BYTES: u32 = 210u;
const CHUNKS: u32 = 8u;

fn chunk_x(c: u32) -> vec2<u32> {
    let first = 128u * (c >> 2u) + 32u * ((c >> 1u) & 1u) + 16u * (c & 1u);
    return vec2<u32>(first, first + 64u);
}

struct Chunk {
    ql: Words16,
    qh: Words16,
    scales: vec2<u32>,  // the words holding the chunk's two int8 scales, at the same place in each
    d: u32,  // the word holding d
}

// Byte of the chunk's first scale in block b of the row at `row`.
fn scale_at(row: u32, b: u32, c: u32) -> u32 {
    return row + b * BLOCK_BYTES + 192u + 8u * (c >> 2u) + 2u * ((c >> 1u) & 1u) + (c & 1u);
}

fn chunk_load(row: u32, b: u32, c: u32) -> Chunk {
    let blk = row + b * BLOCK_BYTES;
    let sc = scale_at(row, b, c) >> 2u;
    return Chunk(load16(blk + 16u * c), load16(blk + 128u + 32u * (c >> 2u) + 16u * (c & 1u)),
                 vec2<u32>(w[sc], w[sc + 1u]), w[(blk + 208u) >> 2u]);
}

fn chunk_dot(q: Chunk, row: u32, b: u32, c: u32, xc: XChunk) -> f32 {
    let blk = row + b * BLOCK_BYTES;
    let shift = (blk & 3u) * 8u;  // every field's offset in the block is even: ql's, qh's place
    let m = (c >> 1u) & 1u;
    let ql = bytes16(q.ql, shift);
    let qh = bytes16(q.qh, shift);
    let nibbles = vec4<u32>(0x0f0f0f0fu);
    let pairs = vec4<u32>(0x03030303u);
    let qa = (ql & nibbles) | (((qh >> vec4<u32>(2u * m)) & pairs) << vec4<u32>(4u));
    let qb = ((ql >> vec4<u32>(4u)) & nibbles) | (((qh >> vec4<u32>(2u * m + 4u)) & pairs) << vec4<u32>(4u));
    let scales = bitcast<vec2<i32>>(q.scales << vec2<u32>(24u - (scale_at(row, b, c) & 3u) * 8u)) >> vec2<u32>(24u);
    let d = unpack2x16float(q.d >> (((blk + 208u) & 2u) * 8u)).x;
    let dots = xc.d * vec2<f32>(f32(dot16(qa, xc.a)), f32(dot16(qb, xc.b))) - 32.0 * xc.s;
    return d * dot(vec2<f32>(scales), dots);
}
