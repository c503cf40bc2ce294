// Gated-FFN activation for glu.wgsl and matvec.wgsl's GLU mode: glu(gate, up) = act(gate) * up,
// act = GELU (tanh form, as ggml) when the const GELU is true, else SiLU.

const SQRT_2_OVER_PI: f32 = 0.7978845608;

fn gelu(x: f32) -> f32 {
    // tanh saturates to ±1 in f32 long before |u| = 10; the clamp keeps exp-based tanh finite.
    let u = clamp(SQRT_2_OVER_PI * (x + 0.044715 * x * x * x), -10.0, 10.0);
    return 0.5 * x * (1.0 + tanh(u));
}

fn silu(x: f32) -> f32 {
    return x / (1.0 + exp(-x));
}

fn glu(gate: f32, up: f32) -> f32 {
    if GELU {
        return gelu(gate) * up;
    }
    return silu(gate) * up;
}
