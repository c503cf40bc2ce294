// y = a + b, elementwise over rows of WIDTH. Dispatch (ceil(WIDTH / WG), rows).
// IN_PLACE: y is also `a` (y += b) and `a` is bound to any other buffer, never read.
// Consts: WIDTH, IN_PLACE, WG.

@group(0) @binding(0) var<storage, read_write> y: array<f32>;
@group(0) @binding(1) var<storage, read> b: array<f32>;
@group(0) @binding(2) var<storage, read> a: array<f32>;

@compute @workgroup_size(WG)
fn main(@builtin(global_invocation_id) id: vec3<u32>) {
    if id.x >= WIDTH {
        return;
    }
    let i = id.y * WIDTH + id.x;
    if IN_PLACE {
        y[i] += b[i];
    } else {
        y[i] = a[i] + b[i];
    }
}
