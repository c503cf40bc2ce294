// Where output row n of the weight (ROW0 included) for token t lands in y: row-major [T, Y_STRIDE],
// except rows from Y2_FROM on, a second projection joined after the first (a layer's k after its
// q: one dispatch computes both), which go to their own [T, N_ALL - Y2_FROM] region at Y2_AT.
// Without a second projection Y2_FROM = N_ALL. Consts: Y_STRIDE, Y2_FROM, Y2_AT, N_ALL.
fn out_index(t: u32, n: u32) -> u32 {
    if n >= Y2_FROM {
        return Y2_AT + t * (N_ALL - Y2_FROM) + n - Y2_FROM;
    }
    return t * Y_STRIDE + n;
}
