// Rotary position embedding of the first N_ROT dims of every head: pair i (i < N_ROT / 2) is
// (i, i + N_ROT / 2) in NeoX layout, (2i, 2i + 1) otherwise, rotated by the angle
// positions[t] * theta_i. One thread per (pair, head): dispatch (ceil(N_HEADS * N_ROT / 2 / WG), T).
// `turns` holds theta_i / 2π per pair (base, scale and frequency factors folded in on the host, in
// f64): reducing position * turns to [-1/2, 1/2) keeps sin/cos accurate at any position.
// IN_PLACE: y is also the input and `x` is bound to any other buffer, never read.
// Consts: N_HEADS, HEAD_DIM, N_ROT, NEOX, IN_PLACE, WG.

@group(0) @binding(0) var<storage, read_write> y: array<f32>;
@group(0) @binding(1) var<storage, read> positions: array<i32>;
@group(0) @binding(2) var<storage, read> turns: array<f32>;
@group(0) @binding(3) var<storage, read> x: array<f32>;

const HALF: u32 = N_ROT / 2u;
const TWO_PI: f32 = 6.283185307179586;

fn src(i: u32) -> f32 {
    if IN_PLACE {
        return y[i];
    }
    return x[i];
}

@compute @workgroup_size(WG)
fn main(@builtin(global_invocation_id) id: vec3<u32>) {
    let pair = id.x % HALF;
    let head = id.x / HALF;
    if head >= N_HEADS {
        return;
    }
    let t = id.y;
    let row = t * N_HEADS * HEAD_DIM + head * HEAD_DIM;
    let ia = row + select(2u * pair, pair, NEOX);
    let ib = ia + select(1u, HALF, NEOX);
    let r = f32(positions[t]) * turns[pair];
    let angle = (r - round(r)) * TWO_PI;
    let c = cos(angle);
    let s = sin(angle);
    let a = src(ia);
    let b = src(ib);
    y[ia] = a * c - b * s;
    y[ib] = a * s + b * c;
    if !IN_PLACE {
        // dims past N_ROT are copied through unrotated
        for (var i = N_ROT + pair; i < HEAD_DIM; i += HALF) {
            y[row + i] = x[row + i];
        }
    }
}
