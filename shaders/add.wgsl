// y = a + b, elementwise over rows of WIDTH. Dispatch (ceil(WIDTH / WG), rows).
// IN_PLACE: y is also `a` (y += b) and `a` is bound to any other buffer, never read.
// B_PER_ROW: b has a row for each row of y; else one row, added to every row (a bias).
// Consts: WIDTH, IN_PLACE, B_PER_ROW, WG.

@group(0) @binding(0) var<storage, read_write> y: array<f32>;
@group(0) @binding(1) var<storage, read> b: array<f32>;
@group(0) @binding(2) var<storage, read> a: array<f32>;

@compute @workgroup_size(WG)
fn main(@builtin(global_invocation_id) id: vec3<u32>) {
    if id.x >= WIDTH {
        return;
    }
    let i = id.y * WIDTH + id.x;
    let bi = b[select(id.x, i, B_PER_ROW)];
    if IN_PLACE {
        y[i] += bi;
    } else {
        y[i] = a[i] + bi;
    }
}
