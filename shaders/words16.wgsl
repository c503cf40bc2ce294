// 16 bytes of blocks.wgsl's weight words from any even byte offset (blocks of 210, 34 or 22 bytes
// are only 2-byte aligned), for the chunk snippets over u32 words (chunk_q6_k.wgsl, chunk_q8_0.wgsl):
// loaded as five words, shifted into place apart from the load (see matvec_chunks.wgsl).

// 16 bytes from an even byte, as loaded: the four words from the one holding the first byte, and
// the word after them (needed where the bytes start mid-word).
struct Words16 {
    words: vec4<u32>,
    end: u32,
}

fn load16(byte: u32) -> Words16 {
    let i = byte >> 2u;
    return Words16(vec4<u32>(w[i], w[i + 1u], w[i + 2u], w[i + 3u]), w[i + 4u]);
}

// The 16 bytes of `q`, shifted into place (`shift`: 8 * the first byte's place in its word).
fn bytes16(q: Words16, shift: u32) -> vec4<u32> {
    let s = vec4<u32>(shift);
    let next = vec4<u32>(q.words.yzw, q.end);
    return select((q.words >> s) | (next << (vec4<u32>(32u) - s)), q.words, s == vec4<u32>(0u));
}
