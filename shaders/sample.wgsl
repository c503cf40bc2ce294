// Token sampling on the GPU, the rules of realm_wasm/sampling.py with at most CAP candidates:
// greedy rows take the top 1 (lowest id on ties); others divide the logits by the temperature,
// keep the top k <= CAP (ties to the lower id), softmax them, cut to the top_p nucleus and pick
// with the counter-based uniform(seed, step).
// Two stages share one binding list (STAGE picks one per pipeline):
//   1: each workgroup selects the top k of a chunk of WG * E logits into `cand`.
//      Dispatch (NB, R) with NB = ceil(V / (WG * E)) chunks per row.
//   2: one workgroup per row selects the top k of the NB * k candidates, sorts them, samples and
//      writes the token id. Dispatch (1, R).
// Selection is exact: a radix select finds the k-th largest key 4 bits at a time (8 rounds), then
// the ids among keys equal to it (ID_ROUNDS rounds), so ties resolve to the lowest ids.
// Composed after reduce_subgroup.wgsl or reduce_shared.wgsl (with R = 16: one sum per digit).
// Consts: V, CAP, NB, E (elements per thread), ID_ROUNDS, STAGE, WG, R.

struct Params {
    temperature: f32,  // 0: greedy
    k: u32,  // candidates kept, 1..CAP (1 when greedy)
    top_p: f32,  // nucleus threshold (see realm_wasm/gpu/ops.py: pack_sampling)
    seed: u32,
    step: u32,
}

@group(0) @binding(0) var<storage, read> logits: array<f32>;  // [R, V]
@group(0) @binding(1) var<storage, read> params: array<Params>;  // [R]
@group(0) @binding(2) var<storage, read_write> cand: array<vec2<u32>>;  // [R, NB, CAP] (key, id)
@group(0) @binding(3) var<storage, read_write> tokens: array<i32>;  // [R]

const SENTINEL_ID: u32 = V;  // pads a chunk; loses every tie against a real id

var<private> keys: array<u32, E>;
var<private> ids: array<u32, E>;
var<workgroup> totals: array<u32, 16>;
var<workgroup> n_picked: atomic<u32>;
var<workgroup> picked: array<vec2<u32>, CAP>;
var<workgroup> sorted_ids: array<u32, CAP>;
var<workgroup> sorted_p: array<f32, CAP>;

// u32 keys that order like the floats (-0 reads as +0: numpy compares them equal).
fn order_key(x: f32) -> u32 {
    let b = bitcast<u32>(select(x, 0.0, x == 0.0));
    return select(b | 0x80000000u, ~b, b >= 0x80000000u);
}

fn key_value(key: u32) -> f32 {
    return bitcast<f32>(select(~key, key & 0x7fffffffu, key >= 0x80000000u));
}

// Workgroup-wide counts of the 4-bit digit at `shift` among live elements whose bits above the
// digit equal `prefix`: of the keys, or (of_ids) of the ids of elements whose key equals `tie`.
fn digit_totals(lane: Lane, of_ids: bool, tie: u32, prefix: u32, shift: u32) -> array<u32, 16> {
    let above = ~((16u << shift) - 1u);  // 16 << 28 wraps to 0: no bits above the top digit
    var c = array<vec4<f32>, 4>();
    for (var e = 0u; e < E; e++) {
        let v = select(keys[e], ids[e], of_ids);
        if (!of_ids || keys[e] == tie) && (v & above) == prefix {
            let digit = vec4<u32>((v >> shift) & 15u);
            c[0] += select(vec4<f32>(0.0), vec4<f32>(1.0), digit == vec4<u32>(0u, 1u, 2u, 3u));
            c[1] += select(vec4<f32>(0.0), vec4<f32>(1.0), digit == vec4<u32>(4u, 5u, 6u, 7u));
            c[2] += select(vec4<f32>(0.0), vec4<f32>(1.0), digit == vec4<u32>(8u, 9u, 10u, 11u));
            c[3] += select(vec4<f32>(0.0), vec4<f32>(1.0), digit == vec4<u32>(12u, 13u, 14u, 15u));
        }
    }
    var counts: array<f32, 16>;
    for (var i = 0u; i < 16u; i++) {
        counts[i] = c[i / 4u][i % 4u];
    }
    let sum = workgroup_sum(lane, counts);  // thread i < 16 holds the total of digit i
    if lane.index < 16u {
        totals[lane.index] = u32(sum);
    }
    workgroupBarrier();
    var out: array<u32, 16>;
    for (var i = 0u; i < 16u; i++) {
        out[i] = totals[i];
    }
    return out;
}

// The k-th best element of the workgroup, ordered by key, then by lowest id: the k best are the
// elements with a larger key, or the same key and an id no larger.
fn select_top(lane: Lane, k: u32) -> vec2<u32> {
    // The k-th largest key: fix its digits from the top, counting the keys above it as we go.
    var key = 0u;
    var above = 0u;
    for (var shift = 28; shift >= 0; shift -= 4) {
        let tot = digit_totals(lane, false, 0u, key, u32(shift));
        var d = 15u;
        while d > 0u && above + tot[d] < k {
            above += tot[d];
            d--;
        }
        key |= d << u32(shift);
    }
    // Among the keys equal to it, the lowest `need` ids: the need-th smallest id bounds them.
    let need = k - above;
    var id = 0u;
    var below = 0u;
    for (var shift = i32(4u * ID_ROUNDS) - 4; shift >= 0; shift -= 4) {
        let tot = digit_totals(lane, true, key, id, u32(shift));
        var d = 0u;
        while d < 15u && below + tot[d] < need {
            below += tot[d];
            d++;
        }
        id |= d << u32(shift);
    }
    return vec2<u32>(key, id);
}

fn pcg_hash(x: u32) -> u32 {
    let state = x * 747796405u + 2891336453u;
    let word = ((state >> ((state >> 28u) + 4u)) ^ state) * 277803737u;
    return (word >> 22u) ^ word;
}

fn uniform01(seed: u32, step: u32) -> f32 {
    return f32(pcg_hash(pcg_hash(seed) ^ step) >> 8u) / 16777216.0;
}

// Load this thread's share of a chunk of logits (stage 1) or of the row's candidates (stage 2).
fn load(row: u32, chunk: u32, lid: u32, p: Params) {
    for (var e = 0u; e < E; e++) {
        keys[e] = 0u;
        ids[e] = SENTINEL_ID;
        let i = e * WG + lid;
        if STAGE == 1u {
            let col = chunk * WG * E + i;
            if col < V {
                let z = logits[row * V + col];
                keys[e] = order_key(select(z / p.temperature, z, p.temperature == 0.0));
                ids[e] = col;
            }
        } else if i < NB * CAP && i % CAP < p.k {
            let kv = cand[row * NB * CAP + i];
            keys[e] = kv.x;
            ids[e] = kv.y;
        }
    }
}

// Thread 0 of stage 2: sampling.sample on the k candidates sorted best first.
fn pick(p: Params) -> u32 {
    if p.temperature == 0.0 {
        return sorted_ids[0];
    }
    let z0 = sorted_p[0];
    var total = 0.0;
    for (var i = 0u; i < p.k; i++) {
        sorted_p[i] = exp(sorted_p[i] - z0);
        total += sorted_p[i];
    }
    var cut = p.k;
    var cum = 0.0;
    for (var i = 0u; i < p.k; i++) {
        sorted_p[i] /= total;
        cum += sorted_p[i];
        if cum >= p.top_p && cut == p.k {
            cut = i + 1u;
        }
    }
    var kept = 0.0;
    for (var i = 0u; i < cut; i++) {
        kept += sorted_p[i];
    }
    let u = uniform01(p.seed, p.step);
    cum = 0.0;
    for (var i = 0u; i < cut; i++) {
        cum += sorted_p[i];
        if cum / kept > u {
            return sorted_ids[i];
        }
    }
    return sorted_ids[cut - 1u];
}

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, lane: Lane) {
    let row = wid.y;
    let p = params[row];
    // Workgroup memory starts undefined on some hosts (lavapipe keeps the last workgroup's);
    // select_top's barriers order this before the first atomicAdd.
    if lane.index == 0u {
        atomicStore(&n_picked, 0u);
    }
    load(row, wid.x, lane.index, p);
    let kth = select_top(lane, p.k);
    for (var e = 0u; e < E; e++) {
        if keys[e] > kth.x || (keys[e] == kth.x && ids[e] <= kth.y) {
            let slot = atomicAdd(&n_picked, 1u);
            if STAGE == 1u {
                cand[(row * NB + wid.x) * CAP + slot] = vec2<u32>(keys[e], ids[e]);
            } else {
                picked[slot] = vec2<u32>(keys[e], ids[e]);
            }
        }
    }
    if STAGE == 1u {
        return;
    }
    workgroupBarrier();
    // Sort the k picks by rank: the number of picks that beat each one.
    let i = lane.index;
    if i < p.k {
        let me = picked[i];
        var rank = 0u;
        for (var j = 0u; j < p.k; j++) {
            let other = picked[j];
            rank += u32(other.x > me.x || (other.x == me.x && other.y < me.y));
        }
        sorted_ids[rank] = me.y;
        sorted_p[rank] = key_value(me.x);
    }
    workgroupBarrier();
    if i == 0u {
        tokens[row] = i32(pick(p));
    }
}
