// A mat-vec followed by the residual RMSNorm of its output (rmsnorm.wgsl's RESIDUAL + THEN, over
// whole rows), in one dispatch: every workgroup writes its rows of y[t], then counts itself in;
// the one that arrives last, which sees all of y[t], runs the norm:
//     resid[t] += y[t] / rms(y[t]) * norm_w          (a post-norm and its residual add)
//     h[t] = resid[t] / rms(resid[t]) * norm_w2     (THEN: the next pre-norm)
// A separate norm dispatch would cost as much again as the norm's work (~5 µs on a big GPU).
// Needs matvec.wgsl with one weight binding holding every row (ROW0 = 0, Y_STRIDE = N).
// Consts (besides matvec.wgsl's): EPS, THEN, WGS (workgroups per token: GRID_X * grid rows).

@group(0) @binding(3) var<storage, read> norm_w: array<f32>;
@group(0) @binding(4) var<storage, read_write> resid: array<f32>;
@group(0) @binding(5) var<storage, read_write> h: array<f32>;
@group(0) @binding(6) var<storage, read> norm_w2: array<f32>;
@group(0) @binding(7) var<storage, read_write> arrived: array<atomic<u32>>;  // [T], 0 between steps

var<workgroup> last_in: bool;
var<workgroup> norm_sums: array<f32, WG>;

// The workgroup's sum of v. Call from uniform control flow.
fn block_sum(i: u32, v: f32) -> f32 {
    norm_sums[i] = v;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if i < s {
            norm_sums[i] += norm_sums[i + s];
        }
        workgroupBarrier();
    }
    let total = norm_sums[0];
    workgroupBarrier();  // the next sum may overwrite norm_sums[0]
    return total;
}

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, lane: Lane) {
    matvec(wid, lane);
    let t = wid.z;
    storageBarrier();  // publish this workgroup's rows of y, then count it in
    if lane.index == 0u {
        last_in = atomicAdd(&arrived[t], 1u) == WGS - 1u;
    }
    if !workgroupUniformLoad(&last_in) {
        return;
    }
    storageBarrier();
    let row = t * N;
    var ss = 0.0;
    for (var i = lane.index; i < N; i += WG) {
        let v = y[row + i];
        ss += v * v;
    }
    let inv = inverseSqrt(block_sum(lane.index, ss) / f32(N) + EPS);
    var ss_out = 0.0;
    for (var i = lane.index; i < N; i += WG) {
        let v = resid[row + i] + y[row + i] * inv * norm_w[i];
        resid[row + i] = v;
        ss_out += v * v;
    }
    if THEN {
        let inv2 = inverseSqrt(block_sum(lane.index, ss_out) / f32(N) + EPS);
        for (var i = lane.index; i < N; i += WG) {
            h[row + i] = resid[row + i] * inv2 * norm_w2[i];
        }
    }
    if lane.index == 0u {
        atomicStore(&arrived[t], 0u);  // ready for the next mat-vec and step
    }
}
