// RMSNorm over groups of GROUP elements of each row: y = x / sqrt(mean(x²) + EPS) * w, or with
// RESIDUAL, y += that (a post-norm fused with the residual add that follows it).
// One workgroup per (group, row): dispatch (WIDTH / GROUP, rows). The weight holds W_LEN values:
// one per group element (W_LEN = GROUP, shared by every group, e.g. a per-head Q/K norm) or one
// per row element (W_LEN = WIDTH).
// IN_PLACE: y is also the input and `x` is bound to any other buffer, never read.
// Composed after reduce_subgroup.wgsl or reduce_shared.wgsl (with R = 1).
// Consts: WIDTH, GROUP, W_LEN, EPS, RESIDUAL, IN_PLACE, WG, R.

@group(0) @binding(0) var<storage, read_write> y: array<f32>;
@group(0) @binding(1) var<storage, read> w: array<f32>;
@group(0) @binding(2) var<storage, read> x: array<f32>;

fn src(i: u32) -> f32 {
    if IN_PLACE {
        return y[i];
    }
    return x[i];
}

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, lane: Lane) {
    let base = wid.y * WIDTH + wid.x * GROUP;
    var ss: array<f32, 1>;
    for (var i = lane.index; i < GROUP; i += WG) {
        let v = src(base + i);
        ss[0] += v * v;
    }
    let inv = inverseSqrt(workgroup_sum(lane, ss) / f32(GROUP) + EPS);
    let w0 = (wid.x * GROUP) % W_LEN;
    for (var i = lane.index; i < GROUP; i += WG) {
        let v = src(base + i) * inv * w[w0 + i];
        if RESIDUAL {
            y[base + i] += v;
        } else {
            y[base + i] = v;
        }
    }
}
