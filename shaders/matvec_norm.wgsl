// A mat-vec followed by the residual RMSNorm of its output (rmsnorm.wgsl's RESIDUAL + THEN, over
// whole rows), in one dispatch: every workgroup writes its rows of y[t], then counts itself in;
// the one that arrives last, which sees all of y[t], runs the norm:
//     resid[t] += y[t] / rms(y[t]) * norm_w          (a post-norm and its residual add; without
//                                                     POST_NORM, resid[t] += y[t]: the add alone)
//     h[t] = resid[t] / rms(resid[t]) * norm_w2     (THEN: the next pre-norm)
// A separate norm dispatch would cost as much again as the norm's work (~5 µs on a big GPU).
// Needs matvec.wgsl with one weight binding holding every row (ROW0 = 0, Y_STRIDE = N).
// Consts (besides matvec.wgsl's): EPS, POST_NORM, THEN, WGS (workgroups per token: GRID_X * grid rows).

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

// Element n of row `row` of resid (to_h false) or h (to_h true), where n < N.
fn put(to_h: bool, row: u32, n: u32, value: f32) {
    if n < N {
        if to_h {
            h[row + n] = value;
        } else {
            resid[row + n] = value;
        }
    }
}

fn put4(to_h: bool, row: u32, at: vec4<u32>, v: vec4<f32>) {
    put(to_h, row, at.x, v.x);
    put(to_h, row, at.y, v.y);
    put(to_h, row, at.z, v.z);
    put(to_h, row, at.w, v.w);
}

// Each thread owns elements i, i + WG, i + 2 WG, i + 3 WG of the row (N <= 4 WG): all it needs is
// loaded at once, so the tail waits on memory once rather than once per pass.
fn norm_in_registers(t: u32, lane: u32) {
    let row = t * N;
    let at = vec4<u32>(lane) + vec4<u32>(0u, WG, 2u * WG, 3u * WG);
    let live = at < vec4<u32>(N);
    let i = min(at, vec4<u32>(N - 1u));  // lanes past N re-read element N - 1, weighted 0
    let yv = select(vec4<f32>(), vec4<f32>(y[row + i.x], y[row + i.y], y[row + i.z], y[row + i.w]), live);
    let rv = vec4<f32>(resid[row + i.x], resid[row + i.y], resid[row + i.z], resid[row + i.w]);
    let wv = vec4<f32>(norm_w[i.x], norm_w[i.y], norm_w[i.z], norm_w[i.w]);
    let w2v = vec4<f32>(norm_w2[i.x], norm_w2[i.y], norm_w2[i.z], norm_w2[i.w]);
    var scale = vec4<f32>(1.0);
    if POST_NORM {
        scale = inverseSqrt(block_sum(lane, dot(yv, yv)) / f32(N) + EPS) * wv;
    }
    let v = select(vec4<f32>(), rv + yv * scale, live);
    put4(false, row, at, v);
    if THEN {
        let inv2 = inverseSqrt(block_sum(lane, dot(v, v)) / f32(N) + EPS);
        put4(true, row, at, v * inv2 * w2v);
    }
}

// Rows longer than 4 WG: a pass for the sum of squares, one for the residual, one for h.
fn norm_in_passes(t: u32, lane: u32) {
    let row = t * N;
    var inv = 1.0;
    if POST_NORM {
        var ss = 0.0;
        for (var i = lane; i < N; i += WG) {
            let v = y[row + i];
            ss += v * v;
        }
        inv = inverseSqrt(block_sum(lane, ss) / f32(N) + EPS);
    }
    var ss_out = 0.0;
    for (var i = lane; i < N; i += WG) {
        let v = resid[row + i] + y[row + i] * select(1.0, inv * norm_w[i], POST_NORM);
        resid[row + i] = v;
        ss_out += v * v;
    }
    if THEN {
        let inv2 = inverseSqrt(block_sum(lane, ss_out) / f32(N) + EPS);
        for (var i = lane; i < N; i += WG) {
            h[row + i] = resid[row + i] * inv2 * norm_w2[i];
        }
    }
}

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, lane: Lane) {
    matvec(wid, lane);
    let t = wid.x;
    storageBarrier();  // publish this workgroup's rows of y, then count it in
    if lane.index == 0u {
        last_in = atomicAdd(&arrived[t], 1u) == WGS - 1u;
    }
    if !workgroupUniformLoad(&last_in) {
        return;
    }
    storageBarrier();
    if N <= 4u * WG {
        norm_in_registers(t, lane.index);
    } else {
        norm_in_passes(t, lane.index);
    }
    if lane.index == 0u {
        atomicStore(&arrived[t], 0u);  // ready for the next mat-vec and step
    }
}
