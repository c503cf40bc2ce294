// Gated activation, elementwise over rows of WIDTH: y = act(gate) * up (glu_act.wgsl). gate and up
// rows are STRIDE floats apart, up starting UP floats into its binding: two separate [rows, WIDTH]
// buffers (STRIDE = WIDTH, UP = 0), or one [rows, 2 * WIDTH] mat-mat result bound twice, gate
// columns first (STRIDE = 2 * WIDTH, UP = WIDTH). Dispatch (ceil(WIDTH / WG), rows).
// Consts: WIDTH, STRIDE, UP, GELU, WG.

@group(0) @binding(0) var<storage, read_write> y: array<f32>;
@group(0) @binding(1) var<storage, read> gate: array<f32>;
@group(0) @binding(2) var<storage, read> up: array<f32>;

@compute @workgroup_size(WG)
fn main(@builtin(global_invocation_id) id: vec3<u32>) {
    if id.x >= WIDTH {
        return;
    }
    let i = id.y * STRIDE + id.x;
    y[id.y * WIDTH + id.x] = glu(gate[i], up[i + UP]);
}
