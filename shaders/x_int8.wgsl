// x rounded to int8 per 32 elements, as llama.cpp's q8_1: scale d = amax / 127, values
// round(x / d) in -127..127 (halves to even). One definition for the two kernels that use it:
// the chunk walk (matvec_chunks.wgsl) multiplies the int8 values, round_x.wgsl writes them back as
// f32 for the mat-mat, so that a token's product with a weight is the same at every step size.

const ROUNDING: f32 = 12582912.0;  // 1.5 * 2^23: v + ROUNDING holds round(v) in its low mantissa bits

// Four values times `inv`, rounded to the nearest integer (in -127..127), as packed int8.
fn int8x4(v: vec4<f32>, inv: f32) -> u32 {
    return pack4xU8(bitcast<vec4<u32>>(v * inv + ROUNDING));
}

// The largest magnitude among 32 values.
fn amax32(v0: vec4<f32>, v1: vec4<f32>, v2: vec4<f32>, v3: vec4<f32>,
          v4: vec4<f32>, v5: vec4<f32>, v6: vec4<f32>, v7: vec4<f32>) -> f32 {
    let m4 = max(max(max(abs(v0), abs(v1)), max(abs(v2), abs(v3))), max(max(abs(v4), abs(v5)), max(abs(v6), abs(v7))));
    return max(max(m4.x, m4.y), max(m4.z, m4.w));
}

// 127 / amax: x times it rounds to the int8 values (0 for 32 zeros).
fn int8_inv(amax: f32) -> f32 {
    return select(0.0, 127.0 / amax, amax > 0.0);
}
