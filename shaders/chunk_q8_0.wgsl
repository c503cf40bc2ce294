// Q8_0 as chunks (matvec_chunks.wgsl, over blocks.wgsl and words16.wgsl): d f16 | qs[32] int8, the
// whole block one chunk (a lane a block: neighbouring lanes read neighbouring blocks); its pieces
// are qs[0 .. 16] and qs[16 .. 32]; value = d * q.
const QK: u32 = 32u;
const BLOCK_BYTES: u32 = 34u;
const CHUNKS: u32 = 1u;

fn chunk_x(c: u32) -> vec2<u32> {
    return vec2<u32>(0u, 16u);
}

struct Chunk {
    a: Words16,
    b: Words16,
    d: u32,  // the word holding d
}

fn chunk_load(row: u32, b: u32, c: u32) -> Chunk {
    let blk = row + b * BLOCK_BYTES;
    return Chunk(load16(blk + 2u), load16(blk + 18u), w[blk >> 2u]);
}

fn chunk_dot(q: Chunk, row: u32, b: u32, c: u32, xc: XChunk) -> f32 {
    let blk = row + b * BLOCK_BYTES;
    let shift = ((blk + 2u) & 3u) * 8u;
    let dots = vec2<f32>(f32(dot16(bytes16(q.a, shift), xc.a)), f32(dot16(bytes16(q.b, shift), xc.b)));
    return unpack2x16float(q.d >> ((blk & 2u) * 8u)).x * dot(xc.d, dots);
}
