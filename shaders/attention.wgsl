// Attention over a KV cache laid out [N_SLOTS, N_CTX, NKV * HD] per layer, for a step of T tokens
// that may belong to different sequences (slots[t]) at any positions (positions[t]).
// Three stages share one binding list (STAGE picks one per pipeline; a step runs them in order):
//   0 store:   write the step's k, v rows into the cache at (slot, position).
//              Dispatch (ceil(NKV * HD / 4 / WG), T).
//   1 attend:  flash attention: token t's G query heads of KV head h against the keys
//              first..pos of its slot (first = pos - WINDOW + 1 with a sliding window, else 0),
//              with an online softmax over tiles of WG keys. The key range is cut into SPLIT
//              chunks, one workgroup each: dispatch (SPLIT, T, NKV). With SPLIT = 1 the result
//              goes straight to `out`; otherwise each chunk leaves (sum of p·v, max, sum of p)
//              in `partials` for stage 2.
//   2 combine: merge the SPLIT partial results of each (token, head). Dispatch (NH, T).
// The cache holds F (f32, or f16 with shader-f16); the arithmetic is f32.
// Consts: HD, G (query heads per KV head), NH, NKV, N_CTX, N_SLOTS, WINDOW (0: none), SCALE,
// SPLIT, STAGE, WG.

@group(0) @binding(0) var<storage, read_write> out: array<vec4<f32>>;  // [T, NH * HD]
@group(0) @binding(1) var<storage, read_write> partials: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read_write> k_cache: array<vec4<F>>;
@group(0) @binding(3) var<storage, read_write> v_cache: array<vec4<F>>;
@group(0) @binding(4) var<storage, read> q: array<vec4<f32>>;  // [T, NH * HD]
@group(0) @binding(5) var<storage, read> k: array<vec4<f32>>;  // [T, NKV * HD]
@group(0) @binding(6) var<storage, read> v: array<vec4<f32>>;  // [T, NKV * HD]
@group(0) @binding(7) var<storage, read> positions: array<i32>;
@group(0) @binding(8) var<storage, read> slots: array<i32>;

const HD4: u32 = HD / 4u;
const KVW4: u32 = NKV * HD4;  // vec4s per cache row
const QW4: u32 = NH * HD4;
const GROUP4: u32 = G * HD4;  // query (and output) vec4s of one KV head's query heads
const PER: u32 = (GROUP4 + WG - 1u) / WG;  // output vec4s per thread
const REC4: u32 = HD4 + 1u;  // a partial: HD4 vec4 of sum(p·v), then (max, sum(p), 0, 0)
const LOWEST: f32 = -3.40282347e38;

var<workgroup> q_tile: array<vec4<f32>, GROUP4>;  // pre-scaled queries
var<workgroup> scores: array<f32, G * WG>;  // [head][key of the tile]
var<workgroup> probs: array<f32, G * WG>;

fn store(wid: vec3<u32>, lid: u32) {
    let t = wid.y;
    let c = wid.x * WG + lid;
    let slot = u32(slots[t]);
    let pos = u32(positions[t]);
    if c >= KVW4 || slot >= N_SLOTS || pos >= N_CTX {
        return;
    }
    let at = (slot * N_CTX + pos) * KVW4 + c;
    k_cache[at] = vec4<F>(k[t * KVW4 + c]);
    v_cache[at] = vec4<F>(v[t * KVW4 + c]);
}

fn attend(wid: vec3<u32>, lid: u32) {
    let split = wid.x;
    let t = wid.y;
    let h = wid.z;
    let pos = u32(positions[t]);
    let first = select(0u, pos + 1u - min(WINDOW, pos + 1u), WINDOW > 0u);
    let chunk = (pos - first + SPLIT) / SPLIT;
    let start = first + split * chunk;
    let end = min(start + chunk, pos + 1u);
    let cache0 = u32(slots[t]) * N_CTX * KVW4 + h * HD4;  // key 0 of this slot and KV head

    for (var i = lid; i < GROUP4; i += WG) {
        q_tile[i] = q[t * QW4 + h * GROUP4 + i] * SCALE;
    }
    workgroupBarrier();

    var m: array<f32, G>;  // running max of each head's scores
    var l: array<f32, G>;  // running sum of exp(score - m)
    var acc: array<vec4<f32>, PER>;
    for (var g = 0u; g < G; g++) {
        m[g] = LOWEST;
    }
    for (var j0 = start; j0 < end; j0 += WG) {
        let n = min(WG, end - j0);
        // Thread i scores key j0 + i for every head of the group. (Loop-body vars get explicit
        // initializers: Naga zeroes a bare `var` once per call, not once per iteration.)
        var s = array<f32, G>();
        if lid < n {
            let row = cache0 + (j0 + lid) * KVW4;
            for (var d = 0u; d < HD4; d++) {
                let kd = vec4<f32>(k_cache[row + d]);
                for (var g = 0u; g < G; g++) {
                    s[g] += dot(q_tile[g * HD4 + d], kd);
                }
            }
            for (var g = 0u; g < G; g++) {
                scores[g * WG + lid] = s[g];
            }
        }
        workgroupBarrier();
        var rescale = array<f32, G>();
        for (var g = 0u; g < G; g++) {
            var mx = m[g];
            for (var i = 0u; i < n; i++) {
                mx = max(mx, scores[g * WG + i]);
            }
            rescale[g] = exp(m[g] - mx);
            m[g] = mx;
            l[g] *= rescale[g];
        }
        if lid < n {
            for (var g = 0u; g < G; g++) {
                probs[g * WG + lid] = exp(s[g] - m[g]);
            }
        }
        workgroupBarrier();
        for (var g = 0u; g < G; g++) {
            for (var i = 0u; i < n; i++) {
                l[g] += probs[g * WG + i];
            }
        }
        for (var c = 0u; c < PER; c++) {
            let o = lid + c * WG;
            if o < GROUP4 {
                let g = o / HD4;
                var a = acc[c] * rescale[g];
                for (var i = 0u; i < n; i++) {
                    a += probs[g * WG + i] * vec4<f32>(v_cache[cache0 + (j0 + i) * KVW4 + o % HD4]);
                }
                acc[c] = a;
            }
        }
        // No barrier needed here: the next tile writes `scores` and `probs` only after its first
        // barrier, which every thread reaches after it is done reading them.
    }

    for (var c = 0u; c < PER; c++) {
        let o = lid + c * WG;
        if o < GROUP4 {
            let g = o / HD4;
            let d = o % HD4;
            let head = h * G + g;
            if SPLIT == 1u {
                out[t * QW4 + head * HD4 + d] = acc[c] / l[g];
            } else {
                let rec = ((t * NH + head) * SPLIT + split) * REC4;
                partials[rec + d] = acc[c];
                if d == 0u {
                    partials[rec + HD4] = vec4<f32>(m[g], l[g], 0.0, 0.0);
                }
            }
        }
    }
}

fn combine(wid: vec3<u32>, lid: u32) {
    let head = wid.x;
    let t = wid.y;
    let rec0 = (t * NH + head) * SPLIT;
    var mx = LOWEST;
    for (var s = 0u; s < SPLIT; s++) {
        mx = max(mx, partials[(rec0 + s) * REC4 + HD4].x);
    }
    var total = 0.0;
    for (var s = 0u; s < SPLIT; s++) {
        let ml = partials[(rec0 + s) * REC4 + HD4];
        total += exp(ml.x - mx) * ml.y;
    }
    for (var d = lid; d < HD4; d += WG) {
        var a = vec4<f32>(0.0);
        for (var s = 0u; s < SPLIT; s++) {
            let rec = (rec0 + s) * REC4;
            a += exp(partials[rec + HD4].x - mx) * partials[rec + d];
        }
        out[t * QW4 + head * HD4 + d] = a / total;
    }
}

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    switch STAGE {
        case 0u: {
            store(wid, lid);
        }
        case 1u: {
            attend(wid, lid);
        }
        default: {
            combine(wid, lid);
        }
    }
}
