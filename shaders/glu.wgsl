// Gated activation, elementwise over rows of WIDTH: y = act(gate) * up, act = GELU (tanh form, as
// ggml) or SiLU. Dispatch (ceil(WIDTH / WG), rows). Consts: WIDTH, GELU, WG.

@group(0) @binding(0) var<storage, read_write> y: array<f32>;
@group(0) @binding(1) var<storage, read> gate: array<f32>;
@group(0) @binding(2) var<storage, read> up: array<f32>;

const SQRT_2_OVER_PI: f32 = 0.7978845608;

fn gelu(x: f32) -> f32 {
    // tanh saturates to ±1 in f32 long before |u| = 10; the clamp keeps exp-based tanh finite.
    let u = clamp(SQRT_2_OVER_PI * (x + 0.044715 * x * x * x), -10.0, 10.0);
    return 0.5 * x * (1.0 + tanh(u));
}

fn silu(x: f32) -> f32 {
    return x / (1.0 + exp(-x));
}

@compute @workgroup_size(WG)
fn main(@builtin(global_invocation_id) id: vec3<u32>) {
    if id.x >= WIDTH {
        return;
    }
    let i = id.y * WIDTH + id.x;
    let g = gate[i];
    y[i] = select(silu(g), gelu(g), GELU) * up[i];
}
