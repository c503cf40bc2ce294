// y[r] = x[rows[r]]: copies the rows that want logits. Dispatch (ceil(WIDTH / WG), R).
// Consts: WIDTH, WG.

@group(0) @binding(0) var<storage, read_write> y: array<f32>;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> rows: array<i32>;

@compute @workgroup_size(WG)
fn main(@builtin(global_invocation_id) id: vec3<u32>) {
    if id.x >= WIDTH {
        return;
    }
    y[id.y * WIDTH + id.x] = x[u32(rows[id.y]) * WIDTH + id.x];
}
