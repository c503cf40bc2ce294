// xr = x rounded as the chunk walk rounds it (x_int8.wgsl), in f32: the mat-mat of a weight whose
// mat-vec walks in chunks reads xr, so prefill and batches multiply the very x decode does.
// Invocation i of row r rounds the row's 32 elements 32i .. 32i+31. Dispatch
// (ceil(K / 32 / WG), rows). Consts: K (a multiple of 32), WG.

@group(0) @binding(0) var<storage, read> x: array<vec4<f32>>;
@group(0) @binding(1) var<storage, read_write> xr: array<vec4<f32>>;

fn rounded(v: vec4<f32>, inv: f32, d: f32) -> vec4<f32> {
    return d * vec4<f32>(unpack4xI8(int8x4(v, inv)));
}

@compute @workgroup_size(WG)
fn main(@builtin(global_invocation_id) id: vec3<u32>) {
    if id.x >= K / 32u {
        return;
    }
    let at = id.y * (K / 4u) + 8u * id.x;
    let v0 = x[at];
    let v1 = x[at + 1u];
    let v2 = x[at + 2u];
    let v3 = x[at + 3u];
    let v4 = x[at + 4u];
    let v5 = x[at + 5u];
    let v6 = x[at + 6u];
    let v7 = x[at + 7u];
    let amax = amax32(v0, v1, v2, v3, v4, v5, v6, v7);
    let inv = int8_inv(amax);
    let d = amax / 127.0;
    xr[at] = rounded(v0, inv, d);
    xr[at + 1u] = rounded(v1, inv, d);
    xr[at + 2u] = rounded(v2, inv, d);
    xr[at + 3u] = rounded(v3, inv, d);
    xr[at + 4u] = rounded(v4, inv, d);
    xr[at + 5u] = rounded(v5, inv, d);
    xr[at + 6u] = rounded(v6, inv, d);
    xr[at + 7u] = rounded(v7, inv, d);
}
