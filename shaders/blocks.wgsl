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

// E2M1 floats doubled (MXFP4, NVFP4): 0 1 2 3 4 6 8 12, then the same negated; the block scales
// carry the compensating 1/2, as in ggml.
const E2M1_GRID = vec4<u32>(0x03020100u, 0x0c080604u, 0xfdfeff00u, 0xf4f8fafcu);

// The codebook I-quants (IQ1, IQ2, IQ3) pick rows of a lookup table, e.g. iq2s_grid(i): word i of
// ggml's grid as packed by realm_wasm/gpu/compose.py (TABLES), which declares the reader where a
// snippet calls it; the table itself sits at the end of the weight binding.

// IQ2_XXS / IQ2_XS / IQ3_XXS sign byte number `index` (0..127): the 7 stored sign bits, the 8th
// making the count of minus signs even (ggml's ksigns_iq2xs table, computed).
fn ksigns(index: u32) -> u32 {
    return index | ((countOneBits(index) & 1u) << 7u);
}

// The four bytes of a word (codebook values), negated where bits 0..3 of `signs` are set.
fn signed_bytes(word: u32, signs: u32) -> vec4<F> {
    let minus = (vec4<u32>(signs) >> vec4<u32>(0u, 1u, 2u, 3u)) & vec4<u32>(1u);
    return vec4<F>(fields(word, 0u, 0xffu)) * (1.0 - 2.0 * vec4<F>(minus));
}

// Eight IQ2 / IQ3 values: the codebook bytes of words lo (elements 0..3) and hi (4..7), negated by
// bits 0..7 of `signs`, times the group scale d.
fn signed8(d: F, lo: u32, hi: u32, signs: u32) -> Dq8 {
    return Dq8(d * signed_bytes(lo, signs), d * signed_bytes(hi, signs >> 4u));
}

// Eight IQ1 values: a ternary codebook row (nibble j = value j + 1) shifted by delta, times d.
fn iq1_values(d: F, row: u32, delta: f32) -> Dq8 {
    let lo = (vec4<u32>(row) >> vec4<u32>(0u, 4u, 8u, 12u)) & vec4<u32>(0xfu);
    let hi = (vec4<u32>(row) >> vec4<u32>(16u, 20u, 24u, 28u)) & vec4<u32>(0xfu);
    return Dq8(d * vec4<F>(vec4<f32>(lo) + (delta - 1.0)), d * vec4<F>(vec4<f32>(hi) + (delta - 1.0)));
}

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
