// RMSNorm over groups of GROUP elements of each row: y = x / sqrt(mean(x²) + EPS) * w, or with
// RESIDUAL, y += that (a post-norm fused with the residual add that follows it); without
// POST_NORM (models with no post-norms, llama), RESIDUAL adds x itself: y += x. With THEN, the
// new y is normalized again into h with weight w2 (the next pre-norm, e.g. the FFN's).
// One workgroup per (group, row): dispatch (WIDTH / GROUP, rows). Weights hold W_LEN values: one
// per group element (W_LEN = GROUP, shared by every group, e.g. a per-head Q/K norm) or one per
// row element (W_LEN = WIDTH).
// IN_PLACE: y is also the input. Bindings a variant does not read are bound to any buffer that
// does not alias y (and h to a writable one).
// Composed after reduce_subgroup.wgsl or reduce_shared.wgsl (with R = 1).
// Consts: WIDTH, GROUP, W_LEN, EPS, POST_NORM, RESIDUAL, THEN, IN_PLACE, WG, R.

@group(0) @binding(0) var<storage, read_write> y: array<f32>;
@group(0) @binding(1) var<storage, read> w: array<f32>;
@group(0) @binding(2) var<storage, read> x: array<f32>;
@group(0) @binding(3) var<storage, read_write> h: array<f32>;
@group(0) @binding(4) var<storage, read> w2: array<f32>;

fn src(i: u32) -> f32 {
    if IN_PLACE {
        return y[i];
    }
    return x[i];
}

// 1 / sqrt(mean(v²) + EPS) over the group, from each thread's sum of squares.
fn inv_rms(lane: Lane, sum_sq: f32) -> f32 {
    var ss: array<f32, 1>;
    ss[0] = sum_sq;
    return inverseSqrt(workgroup_sum(lane, ss) / f32(GROUP) + EPS);
}

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, lane: Lane) {
    let base = wid.y * WIDTH + wid.x * GROUP;
    let w0 = (wid.x * GROUP) % W_LEN;
    var inv = 1.0;
    if POST_NORM {
        var ss = 0.0;
        for (var i = lane.index; i < GROUP; i += WG) {
            let v = src(base + i);
            ss += v * v;
        }
        inv = inv_rms(lane, ss);
    }
    var ss_out = 0.0;
    for (var i = lane.index; i < GROUP; i += WG) {
        var v = src(base + i);
        if POST_NORM {
            v *= inv * w[w0 + i];
        }
        if RESIDUAL {
            v += y[base + i];
        }
        y[base + i] = v;
        ss_out += v * v;
    }
    if THEN {
        workgroupBarrier();  // the first sum's partials are read before the second's are written
        let inv2 = inv_rms(lane, ss_out);
        for (var i = lane.index; i < GROUP; i += WG) {
            h[base + i] = y[base + i] * inv2 * w2[w0 + i];
        }
    }
}
