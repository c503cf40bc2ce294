// Rotary position embedding, in place, of every head of a step's rows: pair i (i < N_ROT / 2) of
// the head's first N_ROT dims is (i, i + N_ROT / 2) in NeoX layout, (2i, 2i + 1) otherwise,
// rotated by the angle positions[t] * theta_i; dims past N_ROT stay as they are. Optionally:
//   NORM:  first an RMSNorm of the head with weight w[HEAD_DIM] (a Q/K norm), eps EPS;
//   STORE: then the head goes into the KV cache at (slots[t], positions[t]), with the same head
//          of v beside it (this is the attention's KV store, for the keys).
// One workgroup per (head, row): dispatch (N_HEADS, T); thread i rotates pair i.
// `turns` holds theta_i / 2π per pair (base, scale and frequency factors folded in on the host, in
// f64): reducing position * turns to [-1/2, 1/2) keeps sin/cos accurate at any position.
// Bindings a variant does not use are bound to any buffer that does not alias y.
// The cache holds F (f32, or f16 with shader-f16).
// Composed after reduce_subgroup.wgsl or reduce_shared.wgsl (R = 1).
// Consts: N_HEADS, HEAD_DIM, N_ROT, NEOX, NORM, EPS, STORE, N_CTX, N_SLOTS, WG (>= N_ROT / 2), R.

@group(0) @binding(0) var<storage, read_write> y: array<f32>;  // [T, N_HEADS * HEAD_DIM]
@group(0) @binding(1) var<storage, read> positions: array<i32>;
@group(0) @binding(2) var<storage, read> turns: array<f32>;
@group(0) @binding(3) var<storage, read> w: array<f32>;
@group(0) @binding(4) var<storage, read> slots: array<i32>;
@group(0) @binding(5) var<storage, read> v: array<f32>;  // [T, N_HEADS * HEAD_DIM]
@group(0) @binding(6) var<storage, read_write> k_cache: array<F>;  // [N_SLOTS, N_CTX, N_HEADS * HEAD_DIM]
@group(0) @binding(7) var<storage, read_write> v_cache: array<F>;

const HALF: u32 = N_ROT / 2u;
const ROW: u32 = N_HEADS * HEAD_DIM;
const TWO_PI: f32 = 6.283185307179586;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, lane: Lane) {
    let head = wid.x;
    let t = wid.y;
    let i = lane.index;
    let at = t * ROW + head * HEAD_DIM;  // the head's first dim
    let pos = u32(positions[t]);
    let slot = u32(slots[t]);
    let cache = (slot * N_CTX + pos) * ROW + head * HEAD_DIM;
    let store = STORE && slot < N_SLOTS && pos < N_CTX;

    // This thread's dims: pair (da, db) when i < HALF, and the unrotated dims N_ROT + i + k * WG.
    let da = select(2u * i, i, NEOX);
    let db = da + select(1u, HALF, NEOX);
    let pair = i < HALF;
    var scale = 1.0;
    if NORM {
        var ss: array<f32, 1>;
        if pair {
            ss[0] = y[at + da] * y[at + da] + y[at + db] * y[at + db];
        }
        for (var d = N_ROT + i; d < HEAD_DIM; d += WG) {
            ss[0] += y[at + d] * y[at + d];
        }
        scale = inverseSqrt(workgroup_sum(lane, ss) / f32(HEAD_DIM) + EPS);
    }
    if pair {
        var a = y[at + da];
        var b = y[at + db];
        if NORM {
            a *= scale * w[da];
            b *= scale * w[db];
        }
        let r = f32(pos) * turns[i];
        let angle = (r - round(r)) * TWO_PI;
        let c = cos(angle);
        let s = sin(angle);
        let ra = a * c - b * s;
        let rb = a * s + b * c;
        y[at + da] = ra;
        y[at + db] = rb;
        if store {
            k_cache[cache + da] = F(ra);
            k_cache[cache + db] = F(rb);
        }
    }
    for (var d = N_ROT + i; d < HEAD_DIM; d += WG) {
        var x = y[at + d];
        if NORM {
            x *= scale * w[d];
            y[at + d] = x;
        }
        if store {
            k_cache[cache + d] = F(x);
        }
    }
    if store {
        for (var d = i; d < HEAD_DIM; d += WG) {
            v_cache[cache + d] = F(v[at + d]);
        }
    }
}
