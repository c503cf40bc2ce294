// GGML weight blocks read in place. WGSL has no 8- or 16-bit storage, so the weight binding is an
// array of u32 words and these helpers fetch bytes at any offset; blocks are never repacked.
// Every dequant_<type>.wgsl snippet builds on them and defines, for its type:
//   const QK: u32           elements per block
//   const BLOCK_BYTES: u32  bytes per block
//   fn dequant8(blk: u32, g: u32) -> Dq8   elements 8g..8g+7 of the block starting at byte blk
// `F` (f16 or f32) is the pipeline's arithmetic type, declared by the composer. Scales are
// combined in f32 and rounded to F once, so the f16 path loses no more than one rounding there.

@group(0) @binding(0) var<storage, read> w: array<u32>;

struct Dq8 {
    lo: vec4<F>,  // elements 8g .. 8g+3
    hi: vec4<F>,  // elements 8g+4 .. 8g+7
}

const BYTE_SHIFTS = vec4<u32>(0u, 8u, 16u, 24u);

// Four bytes starting at any byte offset (GGML blocks of 18, 22, 110 ... bytes are not 4-aligned).
fn load_u32(byte: u32) -> u32 {
    let i = byte >> 2u;
    let s = (byte & 3u) * 8u;
    return select((w[i] >> s) | (w[i + 1u] << (32u - s)), w[i], s == 0u);
}

fn load_u8(byte: u32) -> u32 {
    return (w[byte >> 2u] >> ((byte & 3u) * 8u)) & 0xffu;
}

fn load_i8(byte: u32) -> i32 {
    return bitcast<i32>(load_u8(byte) << 24u) >> 24u;
}

// GGML's 16-bit fields always sit at even offsets.
fn load_u16(byte: u32) -> u32 {
    return (w[byte >> 2u] >> ((byte & 2u) * 8u)) & 0xffffu;
}

fn load_f16(byte: u32) -> f32 {
    return unpack2x16float(load_u16(byte)).x;
}

// One bit field (mask after shifting right by `shift`) out of each of the four bytes of a word:
// nibbles, bit pairs or single high bits of four consecutive elements.
fn fields(word: u32, shift: u32, mask: u32) -> vec4<u32> {
    return (vec4<u32>(word) >> (BYTE_SHIFTS + shift)) & vec4<u32>(mask);
}

// Bits first..first+3 of a bit mask, moved to bit 4: the fifth bit of four consecutive 5-bit codes.
fn fifth_bits(mask: u32, first: u32) -> vec4<u32> {
    return ((vec4<u32>(mask >> first) >> vec4<u32>(0u, 1u, 2u, 3u)) & vec4<u32>(1u)) << vec4<u32>(4u);
}

// The four bytes of a word as signed int8 values.
fn bytes_i8(word: u32) -> vec4<i32> {
    return bitcast<vec4<i32>>(vec4<u32>(word) << (vec4<u32>(24u) - BYTE_SHIFTS)) >> vec4<u32>(24u);
}

// Four 4-bit codes looked up in a 16-entry int8 table packed little-endian into four words.
fn lookup16(table: vec4<u32>, codes: vec4<u32>) -> vec4<F> {
    let words = vec4<u32>(table[codes.x >> 2u], table[codes.y >> 2u], table[codes.z >> 2u], table[codes.w >> 2u]);
    let shifted = words << (vec4<u32>(24u) - (codes & vec4<u32>(3u)) * 8u);
    return vec4<F>(bitcast<vec4<i32>>(shifted) >> vec4<u32>(24u));
}

// The non-linear 4-bit grid of IQ4_NL and IQ4_XS: -127 -104 -83 -65 -49 -35 -22 -10 1 13 25 38 53 69 89 113.
const IQ4_GRID = vec4<u32>(0xbfad9881u, 0xf6eaddcfu, 0x26190d01u, 0x71594535u);

// Q4_K/Q5_K: 6-bit (scale, min) pair `is` (0..7) from the 12 scale bytes at word index `at`.
// Pairs 0..3: low 6 bits of bytes is and is + 4. Pairs 4..7: nibbles of byte is + 4, topped by
// the spare high bits of bytes is - 4 and is. Branch-free: neighbouring lanes decode different pairs.
fn scale_min_k4(at: u32, is: u32) -> vec2<f32> {
    let b = (vec3<u32>(w[at], w[at + 1u], w[at + 2u]) >> vec3<u32>(8u * (is & 3u))) & vec3<u32>(0xffu);
    let low = vec2<u32>(b.x, b.y) & vec2<u32>(63u);
    let high = ((vec2<u32>(b.z) >> vec2<u32>(0u, 4u)) & vec2<u32>(0xfu)) | ((vec2<u32>(b.x, b.y) >> vec2<u32>(6u)) << vec2<u32>(4u));
    return vec2<f32>(select(low, high, is >= 4u));
}

// Q4_K / Q5_K: (d · scale, dmin · min) of the 32-element sub-block `is` of the super-block at byte
// `blk` (d and dmin are its first two f16, the packed 6-bit scales and mins follow).
fn k4_scale_min(blk: u32, is: u32) -> vec2<F> {
    return vec2<F>(unpack2x16float(w[blk >> 2u]) * scale_min_k4((blk >> 2u) + 1u, is));
}
