// y += b, in place, b added to every row of WIDTH. Dispatch (ceil(WIDTH / WG), rows).
// Consts: WIDTH, WG.

@group(0) @binding(0) var<storage, read_write> y: array<f32>;
@group(0) @binding(1) var<storage, read> b: array<f32>;

@compute @workgroup_size(WG)
fn main(@builtin(global_invocation_id) id: vec3<u32>) {
    if id.x >= WIDTH {
        return;
    }
    y[id.y * WIDTH + id.x] += b[id.x];
}
