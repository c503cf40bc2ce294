// Q6_K in 16-byte chunks (matvec_chunks.wgsl, over blocks.wgsl: 210-byte blocks start at any even
// byte, so 16 bytes are read as five u32 words, shifted): ql[128] | qh[64] | scales[16] int8 | d f16.
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

// Bytes byte .. byte + 15 (byte even) as four words.
fn load16(byte: u32) -> vec4<u32> {
    let i = byte >> 2u;
    let words = vec4<u32>(w[i], w[i + 1u], w[i + 2u], w[i + 3u]);
    let s = vec4<u32>((byte & 3u) * 8u);
    let next = vec4<u32>(words.yzw, w[i + 4u]);
    return select((words >> s) | (next << (vec4<u32>(32u) - s)), words, s == vec4<u32>(0u));
}

fn chunk_dot(row: u32, b: u32, c: u32, xc: XChunk) -> f32 {
    let blk = row + b * BLOCK_BYTES;
    let m = (c >> 1u) & 1u;
    let ql = load16(blk + 16u * c);
    let qh = load16(blk + 128u + 32u * (c >> 2u) + 16u * (c & 1u));
    let sc = blk + 192u + 8u * (c >> 2u) + 2u * m + (c & 1u);
    let nibbles = vec4<u32>(0x0f0f0f0fu);
    let pairs = vec4<u32>(0x03030303u);
    let qa = (ql & nibbles) | (((qh >> vec4<u32>(2u * m)) & pairs) << vec4<u32>(4u));
    let qb = ((ql >> vec4<u32>(4u)) & nibbles) | (((qh >> vec4<u32>(2u * m + 4u)) & pairs) << vec4<u32>(4u));
    let dots = xc.d * vec2<f32>(f32(dot16(qa, xc.a)), f32(dot16(qb, xc.b))) - 32.0 * xc.s;
    return load_f16(blk + 208u) * dot(vec2<f32>(f32(load_i8(sc)), f32(load_i8(sc + 4u))), dots);
}
