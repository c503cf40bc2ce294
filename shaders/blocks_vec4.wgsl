// GGML weight blocks read as 16-byte words, for types whose blocks are whole 16-byte multiples
// (Q4_K 144, Q5_K 176) so that every block, and every 16 bytes in it, starts 16-byte aligned: one
// vec4 load a lane. The chunk snippets of those types (chunk_q4_k.wgsl, chunk_q5_k.wgsl) build on
// it; types of other block sizes read through blocks.wgsl's u32 words.

@group(0) @binding(0) var<storage, read> w4: array<vec4<u32>>;

const LOW_NIBBLES = vec4<u32>(0x0f0f0f0fu);

// Q4_K / Q5_K: the 6-bit (scale, min) pair `is` (0..7) of the 12 scale bytes `s` (blocks.wgsl's
// scale_min_k4, from words in hand). Pairs 0..3: low 6 bits of bytes is and is + 4. Pairs 4..7:
// nibbles of byte is + 4, topped by the spare high bits of bytes is - 4 and is.
fn k4_pair(s: vec3<u32>, is: u32) -> vec2<f32> {
    let b = (s >> vec3<u32>(8u * (is & 3u))) & vec3<u32>(0xffu);
    let low = vec2<u32>(b.x, b.y) & vec2<u32>(63u);
    let high = ((vec2<u32>(b.z) >> vec2<u32>(0u, 4u)) & vec2<u32>(0xfu)) | ((vec2<u32>(b.x, b.y) >> vec2<u32>(6u)) << vec2<u32>(4u));
    return vec2<f32>(select(low, high, is >= 4u));
}

// Q4_K / Q5_K chunk: codes qa of sub-block 2j and qb of sub-block 2j + 1 (16 each, unsigned bytes)
// against x's pieces, under the block's header `head` (d, dmin f16, then the 12 scale bytes):
// d · (scale_a · qa·xa + scale_b · qb·xb) − dmin · (min_a · Σxa + min_b · Σxb).
fn k4_chunk_dot(head: vec4<u32>, j: u32, qa: vec4<u32>, qb: vec4<u32>, xc: XChunk) -> f32 {
    let dm = unpack2x16float(head.x);
    let a = k4_pair(head.yzw, 2u * j);
    let b = k4_pair(head.yzw, 2u * j + 1u);
    let dots = xc.d * vec2<f32>(f32(dot16(qa, xc.a)), f32(dot16(qb, xc.b)));
    return dm.x * dot(vec2<f32>(a.x, b.x), dots) - dm.y * dot(vec2<f32>(a.y, b.y), xc.s);
}
