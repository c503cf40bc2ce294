// Constrained sampling's token masks applied to the logits before the sampler, in place: logit v
// of row r becomes -inf where bit v of that row's mask is 0. `masks` holds R_CAP row entries, the
// index of the row's mask or -1 (no mask: the row is left as it is), then the masks, W = ceil(V / 32)
// words each, bit v % 32 of word v / 32 standing for token v. Dispatch (ceil(V / WG), R).
// Consts: V, W, R_CAP, WG.

@group(0) @binding(0) var<storage, read_write> logits: array<f32>;  // [R, V]
@group(0) @binding(1) var<storage, read> masks: array<i32>;  // [R_CAP] mask index, then [*, W] words

@compute @workgroup_size(WG)
fn main(@builtin(global_invocation_id) id: vec3<u32>) {
    let m = masks[id.y];
    if id.x >= V || m < 0 {
        return;
    }
    let word = bitcast<u32>(masks[R_CAP + u32(m) * W + id.x / 32u]);
    if ((word >> (id.x % 32u)) & 1u) == 0u {
        // -inf: WGSL has no literal for it, and a constant expression may not hold it (Tint
        // rejects bitcast<f32>(0xff800000u)), so the bits go through a runtime `let`.
        let minus_inf_bits = 0xff800000u;
        logits[id.y * V + id.x] = bitcast<f32>(minus_inf_bits);
    }
}
