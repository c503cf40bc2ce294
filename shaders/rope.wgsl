// Rotary position embedding, in place, of every head of a step's rows: pair i (i < N_ROT / 2) of
// the head's first N_ROT dims is (i, i + N_ROT / 2) in NeoX layout, (2i, 2i + 1) otherwise,
// rotated by the angle positions[t] * theta_i; dims past N_ROT stay as they are. Optionally:
//   NORM:  first an RMSNorm of the head with HEAD_DIM weights at table[W_AT] (a Q/K norm), eps EPS;
//   STORE: then the head goes into the KV cache at (slots[t], positions[t]), with the same head
//          of v beside it (this is the attention's KV store, for the keys), when the slot is one
//          of the N_SLOTS from SLOT0 that these cache bindings hold;
//   ALSO_HEADS > 0: a second activation, y_also, rotated by the same angles in the same dispatch
//          (the queries beside the keys), with its own norm (ALSO_NORM, ALSO_EPS) and no store.
// One workgroup per (head, row): dispatch (ALSO_HEADS + N_HEADS, T), y_also's heads first; thread
// i rotates pair i.
// `table` holds theta_i / 2π per pair (base, scale and frequency factors folded in on the host, in
// f64): reducing position * turns to [-1/2, 1/2) keeps sin/cos accurate at any position. The norm
// weights follow in the same buffer (y's at W_AT, y_also's at ALSO_W_AT): WebGPU guarantees only
// 8 storage buffers per kernel.
// Bindings a variant does not use are bound to any buffer that does not alias y.
// The cache holds F (f32, or f16 with shader-f16).
// Composed after reduce_subgroup.wgsl or reduce_shared.wgsl (R = 1).
// Consts: N_HEADS, HEAD_DIM, N_ROT, NEOX, NORM, EPS, W_AT, STORE, N_CTX, SLOT0, N_SLOTS, ALSO_HEADS,
// ALSO_NORM, ALSO_EPS, ALSO_W_AT, WG (>= N_ROT / 2), R.

@group(0) @binding(0) var<storage, read_write> y: array<f32>;  // [T, N_HEADS * HEAD_DIM]
@group(0) @binding(1) var<storage, read> positions: array<i32>;
@group(0) @binding(2) var<storage, read> table: array<f32>;  // turns, then norm weights
@group(0) @binding(3) var<storage, read> slots: array<i32>;
@group(0) @binding(4) var<storage, read> v: array<f32>;  // [T, N_HEADS * HEAD_DIM]
@group(0) @binding(5) var<storage, read_write> k_cache: array<F>;  // [N_SLOTS, N_CTX, N_HEADS * HEAD_DIM], slots from SLOT0
@group(0) @binding(6) var<storage, read_write> v_cache: array<F>;
@group(0) @binding(7) var<storage, read_write> y_also: array<f32>;  // [T, ALSO_HEADS * HEAD_DIM]

const HALF: u32 = N_ROT / 2u;
const ROW: u32 = N_HEADS * HEAD_DIM;
const ALSO_ROW: u32 = ALSO_HEADS * HEAD_DIM;
const TWO_PI: f32 = 6.283185307179586;

// WGSL cannot choose a storage buffer through a pointer: the workgroup's part is a branch.
fn load(also: bool, at: u32) -> f32 {
    if also {
        return y_also[at];
    }
    return y[at];
}

fn put(also: bool, at: u32, x: f32) {
    if also {
        y_also[at] = x;
    } else {
        y[at] = x;
    }
}

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, lane: Lane) {
    let also = wid.x < ALSO_HEADS;
    let head = select(wid.x - ALSO_HEADS, wid.x, also);
    let norm = select(NORM, ALSO_NORM, also);
    let w_at = select(W_AT, ALSO_W_AT, also);
    let t = wid.y;
    let i = lane.index;
    let at = t * select(ROW, ALSO_ROW, also) + head * HEAD_DIM;  // the head's first dim
    let pos = u32(positions[t]);
    let slot = u32(slots[t]) - SLOT0;  // past N_SLOTS (wrapping below SLOT0): another group's
    let cache = (slot * N_CTX + pos) * ROW + head * HEAD_DIM;
    let store = STORE && !also && slot < N_SLOTS && pos < N_CTX;

    // This thread's dims: pair (da, db) when i < HALF, and the unrotated dims N_ROT + i + k * WG.
    let da = select(2u * i, i, NEOX);
    let db = da + select(1u, HALF, NEOX);
    let pair = i < HALF;
    var scale = 1.0;
    if norm {
        var ss: array<f32, 1>;
        if pair {
            let a = load(also, at + da);
            let b = load(also, at + db);
            ss[0] = a * a + b * b;
        }
        for (var d = N_ROT + i; d < HEAD_DIM; d += WG) {
            let x = load(also, at + d);
            ss[0] += x * x;
        }
        scale = inverseSqrt(workgroup_sum(lane, ss) / f32(HEAD_DIM) + select(EPS, ALSO_EPS, also));
    }
    if pair {
        var a = load(also, at + da);
        var b = load(also, at + db);
        if norm {
            a *= scale * table[w_at + da];
            b *= scale * table[w_at + db];
        }
        let r = f32(pos) * table[i];
        let angle = (r - round(r)) * TWO_PI;
        let c = cos(angle);
        let s = sin(angle);
        let ra = a * c - b * s;
        let rb = a * s + b * c;
        put(also, at + da, ra);
        put(also, at + db, rb);
        if store {
            k_cache[cache + da] = F(ra);
            k_cache[cache + db] = F(rb);
        }
    }
    for (var d = N_ROT + i; d < HEAD_DIM; d += WG) {
        var x = load(also, at + d);
        if norm {
            x *= scale * table[w_at + d];
            put(also, at + d, x);
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
