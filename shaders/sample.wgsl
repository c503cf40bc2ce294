// Token sampling on the GPU, the rules of realm_wasm/sampling.py with at most CAP candidates:
// greedy rows take the top 1 (lowest id on ties); others divide the logits by the temperature,
// keep the top k <= CAP (ties to the lower id), softmax them, cut to the top_p nucleus and pick
// with the counter-based uniform(seed, step).
// Two stages share one binding list (STAGE picks one per pipeline):
//   1: each workgroup writes the top k of a chunk of WG * E logits, best first, into `cand`.
//      Dispatch (NB, R), NB chunks per row.
//   2: one workgroup per row takes the top k of the NB * k candidates, samples and writes the
//      token id. Dispatch (1, R).
// Elements are (key, id) pairs ordered by key (the float's order as a u32), then by lower id.
// Selection is exact and needs three barriers: the k-th best of the threads' own best elements is
// a bound every top-k element reaches, and only the k threads whose best reaches it can hold such
// elements, so at most k * E candidates remain; ranking them against each other sorts them.
// Loops that load are unrolled by hand, four loads per iteration (wgpu's shader translator guards
// every loop, which keeps drivers from unrolling them), and each thread reads its elements twice
// rather than keeping them in an array (indexing one in a loop would put it in slow local memory).
// Consts: V, CAP (<= WG), NB, E (elements per thread, a multiple of 4), STAGE, WG (a multiple of 8).

struct Params {
    temperature: f32,  // 0: greedy
    k: u32,  // candidates kept, 1..CAP (1 when greedy)
    top_p: f32,  // nucleus threshold (see realm_wasm/gpu/ops.py: nucleus_threshold)
    seed: u32,
    step: u32,
}

@group(0) @binding(0) var<storage, read> logits: array<f32>;  // [R, V]
@group(0) @binding(1) var<storage, read> params: array<Params>;  // [R]
@group(0) @binding(2) var<storage, read_write> cand: array<vec2<u32>>;  // [R, NB, CAP]
@group(0) @binding(3) var<storage, read_write> tokens: array<i32>;  // [R]

var<workgroup> best_keys: array<vec4<u32>, WG / 4u>;  // each thread's best element, 4 per vec4
var<workgroup> best_ids: array<vec4<u32>, WG / 4u>;
var<workgroup> bound: vec2<u32>;
var<workgroup> n_found: atomic<u32>;
var<workgroup> found: array<vec2<u32>, CAP * E>;
var<workgroup> top: array<vec2<u32>, CAP>;  // stage 2: the k best, best first
var<workgroup> probs: array<f32, CAP>;

// u32 keys that order like the floats (-0 reads as +0: numpy compares them equal).
fn order_key(x: f32) -> u32 {
    let b = bitcast<u32>(select(x, 0.0, x == 0.0));
    return select(b | 0x80000000u, ~b, b >= 0x80000000u);
}

fn key_value(key: u32) -> f32 {
    return bitcast<f32>(select(~key, key & 0x7fffffffu, key >= 0x80000000u));
}

fn beats(a: vec2<u32>, b: vec2<u32>) -> bool {
    return a.x > b.x || (a.x == b.x && a.y < b.y);
}

// How many of four elements (keys, ids) beat `me`.
fn count_beating(keys: vec4<u32>, ids: vec4<u32>, me: vec2<u32>) -> u32 {
    let wins = (keys > vec4<u32>(me.x)) | ((keys == vec4<u32>(me.x)) & (ids < vec4<u32>(me.y)));
    return dot(select(vec4<u32>(0u), vec4<u32>(1u), wins), vec4<u32>(1u));
}

// Element e of this thread: of a chunk of logits, strided (neighbours read neighbouring words);
// or of the row's candidates, E consecutive ones (of one chunk's ranked list, so the best of them
// says much about the rest). Padding gets key 0 (below every float) and a unique id past V.
fn element(row: u32, chunk: u32, lid: u32, e: u32, p: Params) -> vec2<u32> {
    if STAGE == 1u {
        let col = chunk * WG * E + e * WG + lid;
        if col >= V {
            return vec2<u32>(0u, col);
        }
        let z = logits[row * V + col];
        return vec2<u32>(order_key(select(z / p.temperature, z, p.temperature == 0.0)), col);
    }
    let i = lid * E + e;
    if i < NB * CAP && i % CAP < p.k {
        return cand[row * NB * CAP + i];
    }
    return vec2<u32>(0u, V + i);
}

fn better(a: vec2<u32>, b: vec2<u32>) -> vec2<u32> {
    return select(b, a, beats(a, b));
}

fn keep_if_reaching(b: vec2<u32>, x: vec2<u32>) {
    if !beats(b, x) {
        found[atomicAdd(&n_found, 1u)] = x;
    }
}

fn pcg_hash(x: u32) -> u32 {
    let state = x * 747796405u + 2891336453u;
    let word = ((state >> ((state >> 28u) + 4u)) ^ state) * 277803737u;
    return (word >> 22u) ^ word;
}

fn uniform01(seed: u32, step: u32) -> f32 {
    return f32(pcg_hash(pcg_hash(seed) ^ step) >> 8u) / 16777216.0;
}

fn probs4(i: u32) -> vec4<f32> {
    return vec4<f32>(probs[i], probs[min(i + 1u, CAP - 1u)], probs[min(i + 2u, CAP - 1u)], probs[min(i + 3u, CAP - 1u)]);
}

// sampling.sample on the k best (`top`, best first; `probs` holds exp(z - z_best)); one thread.
fn pick(p: Params) -> u32 {
    if p.temperature == 0.0 {
        return top[0].y;
    }
    var total = 0.0;
    for (var i = 0u; i < p.k; i += 4u) {
        total += dot(probs4(i), vec4<f32>(vec4<u32>(i) + vec4<u32>(0u, 1u, 2u, 3u) < vec4<u32>(p.k)));
    }
    // The nucleus: the shortest prefix whose share of the mass reaches top_p.
    var cut = p.k;
    var cum = 0.0;
    for (var i = 0u; i < p.k; i++) {
        cum += probs[i] / total;
        if cum >= p.top_p {
            cut = i + 1u;
            break;
        }
    }
    let kept = cum;
    let u = uniform01(p.seed, p.step);
    cum = 0.0;
    for (var i = 0u; i < cut; i++) {
        cum += probs[i] / total;
        if cum / kept > u {
            return top[i].y;
        }
    }
    return top[cut - 1u].y;
}

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let row = wid.y;
    let chunk = wid.x;
    let p = params[row];
    var best = vec2<u32>(0u, 0xffffffffu);  // loses to every element
    for (var e = 0u; e < E; e += 4u) {
        let x0 = element(row, chunk, lid, e, p);
        let x1 = element(row, chunk, lid, e + 1u, p);
        let x2 = element(row, chunk, lid, e + 2u, p);
        let x3 = element(row, chunk, lid, e + 3u, p);
        best = better(better(best, x0), better(better(x1, x2), x3));
    }
    best_keys[lid / 4u][lid % 4u] = best.x;
    best_ids[lid / 4u][lid % 4u] = best.y;
    if lid == 0u {
        // Workgroup memory starts undefined on some hosts (lavapipe keeps the last workgroup's).
        atomicStore(&n_found, 0u);
    }
    workgroupBarrier();
    // The k-th best of the threads' bests (unique: ids are).
    var rank = 0u;
    for (var u = 0u; u < WG / 4u; u += 2u) {
        rank += count_beating(best_keys[u], best_ids[u], best) + count_beating(best_keys[u + 1u], best_ids[u + 1u], best);
    }
    if rank == p.k - 1u {
        bound = best;
    }
    workgroupBarrier();
    let b = bound;
    for (var e = 0u; e < E; e += 4u) {
        let x0 = element(row, chunk, lid, e, p);
        let x1 = element(row, chunk, lid, e + 1u, p);
        let x2 = element(row, chunk, lid, e + 2u, p);
        let x3 = element(row, chunk, lid, e + 3u, p);
        keep_if_reaching(b, x0);
        keep_if_reaching(b, x1);
        keep_if_reaching(b, x2);
        keep_if_reaching(b, x3);
    }
    workgroupBarrier();
    // Each candidate's rank among the others is its place in the sorted top k.
    let n = atomicLoad(&n_found);
    for (var c = lid; c < n; c += WG) {
        let me = found[c];
        var r = 0u;
        for (var j = 0u; j < n; j += 4u) {
            let f0 = found[j];
            let f1 = found[min(j + 1u, n - 1u)];
            let f2 = found[min(j + 2u, n - 1u)];
            let f3 = found[min(j + 3u, n - 1u)];
            let real = vec4<u32>(j) + vec4<u32>(0u, 1u, 2u, 3u) < vec4<u32>(n);
            let keys = select(vec4<u32>(0u), vec4<u32>(f0.x, f1.x, f2.x, f3.x), real);
            let ids = select(vec4<u32>(0xffffffffu), vec4<u32>(f0.y, f1.y, f2.y, f3.y), real);
            r += count_beating(keys, ids, me);
        }
        if r < p.k {
            if STAGE == 1u {
                cand[(row * NB + chunk) * CAP + r] = me;
            } else {
                top[r] = me;
            }
        }
    }
    if STAGE == 2u {
        workgroupBarrier();
        if lid < p.k {
            probs[lid] = exp(key_value(top[lid].x) - key_value(top[0].x));
        }
        workgroupBarrier();
        if lid == 0u {
            tokens[row] = i32(pick(p));
        }
    }
}
