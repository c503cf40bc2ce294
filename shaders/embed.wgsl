// y[t] = table[tokens[t]] * SCALE for the ROWS table rows ROW0.. held by one weight binding (a
// table larger than a binding is several dispatches, one per chunk; tokens outside a chunk are
// skipped there). Each thread dequantizes one 8-element group. Dispatch (ceil(WIDTH / 8 / WG), T).
// Composed after blocks.wgsl + dequant_<type>.wgsl (binding 0 is the table `w`), with F = f32.
// Consts: WIDTH, ROW0, ROWS, SCALE, WG.

@group(0) @binding(1) var<storage, read> tokens: array<i32>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;

const ROW_BYTES: u32 = WIDTH / QK * BLOCK_BYTES;

@compute @workgroup_size(WG)
fn main(@builtin(global_invocation_id) id: vec3<u32>) {
    let e = 8u * id.x;
    let row = u32(tokens[id.y]) - ROW0;  // wraps around for tokens below ROW0
    if e >= WIDTH || row >= ROWS {
        return;
    }
    let q = dequant8(row * ROW_BYTES + e / QK * BLOCK_BYTES, e % QK / 8u);
    let at = id.y * WIDTH + e;
    for (var j = 0u; j < 4u; j++) {
        y[at + j] = f32(q.lo[j]) * SCALE;
        y[at + 4u + j] = f32(q.hi[j]) * SCALE;
    }
}
