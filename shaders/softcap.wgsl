// y = CAP * tanh(y / CAP), in place, over rows of WIDTH. Dispatch (ceil(WIDTH / WG), rows).
// Consts: WIDTH, CAP, WG.

@group(0) @binding(0) var<storage, read_write> y: array<f32>;

@compute @workgroup_size(WG)
fn main(@builtin(global_invocation_id) id: vec3<u32>) {
    if id.x >= WIDTH {
        return;
    }
    let i = id.y * WIDTH + id.x;
    // tanh is 1 to f32 precision past 10; the clamp keeps exp-based tanh from inf / inf
    y[i] = CAP * tanh(clamp(y[i] / CAP, -10.0, 10.0));
}
