// The plain mat-vec entry point (see matvec.wgsl).

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, lane: Lane) {
    matvec(wid, lane);
}
