// Q8_0: d f16 | qs[32] int8; value = d * q.
const QK: u32 = 32u;
const BLOCK_BYTES: u32 = 34u;

fn dequant8(blk: u32, g: u32) -> Dq8 {
    let d = F(load_f16(blk));
    let at = blk + 2u + 8u * g;
    return Dq8(d * vec4<F>(bytes_i8(load_u32(at))), d * vec4<F>(bytes_i8(load_u32(at + 4u))));
}
