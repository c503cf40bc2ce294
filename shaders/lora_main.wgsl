// The LoRA side paths after a mat-mat (lora.wgsl), before a GLU or a residual norm reads its
// result: y[t, n] += sum_j B_j[n] · u_j[t] for the LORA_N rows of the weight, WG rows per
// workgroup, token t = workgroup_id.y. Tokens without adapters are left as they are.
// Consts: WG, lora.wgsl's (LORA_AT = 1) and rows_out.wgsl's (where rows land in y, as the mat-mat wrote them).

@group(0) @binding(0) var<storage, read_write> y: array<f32>;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let t = wid.y;
    if !lora_any(t) {
        return;
    }
    let n = wid.x * WG + lid;
    if n < LORA_N {
        y[out_index(t, n)] += lora_row(t, n, 0u, 1u);
    }
}

// u as the group's A·x kernel (lora_shrink.wgsl) wrote it for the step
fn lora_u(t: u32, j: u32, p: u32, i: u32) -> vec4<f32> {
    return lora_side[lora_u_at(t, j, p) + i];
}

fn lora_r4(j: u32, slot: i32, p: u32) -> u32 {
    return lora_rows(slot, p) / 4u;
}
