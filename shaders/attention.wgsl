// Attention over a KV cache laid out [N_SLOTS, N_CTX, NKV * HD] per layer, for a step of T tokens
// that may belong to different sequences (slots[t]) at any positions (positions[t]). The step's
// keys and values are already in the cache (rope.wgsl with STORE puts them there). The bindings
// hold slots SLOT0 .. SLOT0 + N_SLOTS - 1 (a cache over the binding limit is cut into such groups,
// a dispatch each): the workgroups of other slots' tokens return at once.
// Flash attention of token t's query heads against the keys first..pos of its slot (first = pos -
// WINDOW + 1 with a sliding window, else 0), TK keys at a time with an online softmax. A workgroup
// takes HB of the G query heads that share KV head h, so each of its threads owns one output vec4
// of one head. Each key's dot products are spread over C threads (4 vec4 each, neighbours reading
// neighbouring bytes) whose partial sums meet in workgroup memory. The key range is cut into SPLIT
// chunks, one workgroup each: dispatch (SPLIT, T, NKV * G / HB). With SPLIT = 1 the result goes
// straight to `out`. Otherwise each chunk leaves (sum of p·v, max, sum of p) in `partials`, and
// the chunk's workgroup that finishes last (a counter per token and head block) merges them: one
// dispatch, where a separate merge would cost a second one (~5 µs each on a big GPU).
// The cache holds F (f32, or f16 with shader-f16); the arithmetic is f32.
// Loops that load are unrolled by hand, several loads per iteration: wgpu's shader translator
// guards every loop, which keeps drivers from unrolling them, and loads in a loop that is not
// unrolled wait for each other.
// Consts: HD, G (query heads per KV head), HB (heads per workgroup, dividing G, HB * HD / 4 <= WG),
// NH, NKV, N_CTX, SLOT0, N_SLOTS, WINDOW (0: none), SCALE, SOFTCAP (0: none; else scores become SOFTCAP·tanh(s / SOFTCAP)),
// SPLIT (<= WG), WG.

@group(0) @binding(0) var<storage, read_write> out: array<vec4<f32>>;  // [T, NH * HD]
@group(0) @binding(1) var<storage, read_write> partials: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> k_cache: array<vec4<F>>;
@group(0) @binding(3) var<storage, read> v_cache: array<vec4<F>>;
@group(0) @binding(4) var<storage, read> q: array<vec4<f32>>;  // [T, NH * HD]
@group(0) @binding(5) var<storage, read> positions: array<i32>;
@group(0) @binding(6) var<storage, read> slots: array<i32>;
@group(0) @binding(7) var<storage, read_write> arrived: array<atomic<u32>>;  // [T, NKV * BLOCKS], kept 0 between steps

const HD4: u32 = HD / 4u;
const KVW4: u32 = NKV * HD4;  // vec4s per cache row
const QW4: u32 = NH * HD4;
const C: u32 = (HD4 + 3u) / 4u;  // threads sharing one key's dot products
const TK: u32 = WG / C;  // keys per tile
const BLOCKS: u32 = G / HB;  // workgroups per KV head
const REC4: u32 = HD4 + 1u;  // a partial: HD4 vec4 of sum(p·v), then (max, sum(p), 0, 0)
const LOWEST: f32 = -3.4028234663852886e38;  // -FLT_MAX exactly: Tint rejects literals that round

var<workgroup> q_tile: array<vec4<f32>, HB * 4u * C>;  // [head][vec4], zero past HD4, pre-scaled
var<workgroup> dots: array<f32, HB * TK * C>;  // [head][key of the tile][thread of the key]
var<workgroup> scores: array<f32, HB * TK>;  // [head][key of the tile]
var<workgroup> weights: array<vec2<f32>, HB * SPLIT>;  // merge: (max, sum of p) of each head's chunks
var<workgroup> last_chunk: bool;  // this workgroup finished its token's and heads' chunks last

// exp(score - mx) of keys j..j+3 of the tile (0 past the n keys it has).
fn probs4(s0: u32, j: u32, n: u32, mx: f32) -> vec4<f32> {
    let z = vec4<f32>(scores[s0 + min(j, TK - 1u)], scores[s0 + min(j + 1u, TK - 1u)],
                      scores[s0 + min(j + 2u, TK - 1u)], scores[s0 + min(j + 3u, TK - 1u)]);
    return select(vec4<f32>(0.0), exp(z - mx), vec4<u32>(j) + vec4<u32>(0u, 1u, 2u, 3u) < vec4<u32>(n));
}

fn attend(wid: vec3<u32>, lid: u32) {
    let split = wid.x;
    let t = wid.y;
    let h = wid.z / BLOCKS;
    let head0 = h * G + (wid.z % BLOCKS) * HB;
    let pos = u32(positions[t]);
    let first = select(0u, pos + 1u - min(WINDOW, pos + 1u), WINDOW > 0u);
    // At least a tile per chunk: short ranges leave the last splits empty rather than thin.
    let chunk = max((pos - first + SPLIT) / SPLIT, TK);
    let start = first + split * chunk;
    let end = min(start + chunk, pos + 1u);
    let cache0 = (u32(slots[t]) - SLOT0) * N_CTX * KVW4 + h * HD4;  // key 0 of this slot and KV head

    for (var i = lid; i < HB * 4u * C; i += WG) {
        let d = i % (4u * C);
        let qv = q[t * QW4 + (head0 + i / (4u * C)) * HD4 + min(d, HD4 - 1u)];
        q_tile[i] = select(vec4<f32>(0.0), qv * SCALE, d < HD4);
    }
    workgroupBarrier();

    let key = lid / C;  // scoring: this thread's key of the tile and its part of the key
    let part = lid % C;
    let g = lid / HD4;  // p·v: the head and vec4 this thread owns
    let d = lid % HD4;
    let owner = lid < HB * HD4;
    var m = LOWEST;  // running max of the head's scores
    var l = 0.0;  // running sum of exp(score - m)
    var acc = vec4<f32>(0.0);
    for (var j0 = start; j0 < end; j0 += TK) {
        let n = min(TK, end - j0);
        if key < TK {
            let row = cache0 + min(j0 + key, end - 1u) * KVW4;
            // vec4s part, part + C, part + 2C, part + 3C of the key (past HD4 they repeat the
            // last one, where the query is zero)
            let k0 = vec4<f32>(k_cache[row + min(part, HD4 - 1u)]);
            let k1 = vec4<f32>(k_cache[row + min(part + C, HD4 - 1u)]);
            let k2 = vec4<f32>(k_cache[row + min(part + 2u * C, HD4 - 1u)]);
            let k3 = vec4<f32>(k_cache[row + min(part + 3u * C, HD4 - 1u)]);
            for (var hg = 0u; hg < HB; hg++) {
                let q0 = hg * 4u * C + part;
                dots[(hg * TK + key) * C + part] = dot(q_tile[q0], k0) + dot(q_tile[q0 + C], k1)
                    + dot(q_tile[q0 + 2u * C], k2) + dot(q_tile[q0 + 3u * C], k3);
            }
        }
        workgroupBarrier();
        for (var hk = lid; hk < HB * TK; hk += WG) {  // hk = head * TK + key
            var sum = 0.0;
            for (var i = 0u; i < C; i += 4u) {
                let at = hk * C;
                sum += (dots[at + i] + dots[at + min(i + 1u, C - 1u)] * f32(i + 1u < C))
                    + (dots[at + min(i + 2u, C - 1u)] * f32(i + 2u < C) + dots[at + min(i + 3u, C - 1u)] * f32(i + 3u < C));
            }
            // the clamp keeps exp-based tanh from inf / inf (tanh is 1 to f32 precision past 10)
            scores[hk] = select(sum, SOFTCAP * tanh(clamp(sum / SOFTCAP, -10.0, 10.0)), SOFTCAP > 0.0);
        }
        workgroupBarrier();
        // The next tile writes `dots` and `scores` only after its first barrier, which every
        // thread reaches once done reading them here.
        if owner {
            let s0 = g * TK;
            var mx = m;
            for (var j = 0u; j < n; j += 4u) {
                let z = vec4<f32>(scores[s0 + j], scores[s0 + min(j + 1u, n - 1u)],
                                  scores[s0 + min(j + 2u, n - 1u)], scores[s0 + min(j + 3u, n - 1u)]);
                mx = max(mx, max(max(z.x, z.y), max(z.z, z.w)));
            }
            let rescale = exp(m - mx);
            acc *= rescale;
            l *= rescale;
            let at = cache0 + d;
            let last = end - 1u;
            for (var j = 0u; j < n; j += 8u) {
                let pa = probs4(s0, j, n, mx);
                let pb = probs4(s0, j + 4u, n, mx);
                let key = j0 + j;
                acc += pa.x * vec4<f32>(v_cache[at + key * KVW4])
                    + pa.y * vec4<f32>(v_cache[at + min(key + 1u, last) * KVW4])
                    + pa.z * vec4<f32>(v_cache[at + min(key + 2u, last) * KVW4])
                    + pa.w * vec4<f32>(v_cache[at + min(key + 3u, last) * KVW4])
                    + pb.x * vec4<f32>(v_cache[at + min(key + 4u, last) * KVW4])
                    + pb.y * vec4<f32>(v_cache[at + min(key + 5u, last) * KVW4])
                    + pb.z * vec4<f32>(v_cache[at + min(key + 6u, last) * KVW4])
                    + pb.w * vec4<f32>(v_cache[at + min(key + 7u, last) * KVW4]);
                l += dot(pa + pb, vec4<f32>(1.0));
            }
            m = mx;
        }
    }

    if owner {
        let head = head0 + g;
        if SPLIT == 1u {
            out[t * QW4 + head * HD4 + d] = acc / l;
        } else {
            let rec = ((t * NH + head) * SPLIT + split) * REC4;
            partials[rec + d] = acc;
            if d == 0u {
                partials[rec + HD4] = vec4<f32>(m, l, 0.0, 0.0);
            }
        }
    }
}

// (max, sum of p) of chunk s of head g; past SPLIT, a chunk that weighs nothing.
fn chunk_weight(g: u32, s: u32) -> vec2<f32> {
    return select(vec2<f32>(LOWEST, 0.0), weights[g * SPLIT + min(s, SPLIT - 1u)], s < SPLIT);
}

// Merge the SPLIT partial results of token t's heads head0 .. head0 + HB - 1 (each thread one
// output vec4 of one head, as in attend). Call from uniform control flow.
fn merge(t: u32, head0: u32, lid: u32) {
    for (var i = lid; i < HB * SPLIT; i += WG) {
        weights[i] = partials[((t * NH + head0 + i / SPLIT) * SPLIT + i % SPLIT) * REC4 + HD4].xy;
    }
    workgroupBarrier();
    let g = lid / HD4;
    let d = lid % HD4;
    if lid < HB * HD4 {
        var mx = LOWEST;
        for (var s = 0u; s < SPLIT; s += 4u) {
            mx = max(mx, max(max(chunk_weight(g, s).x, chunk_weight(g, s + 1u).x),
                             max(chunk_weight(g, s + 2u).x, chunk_weight(g, s + 3u).x)));
        }
        let at = (t * NH + head0 + g) * SPLIT * REC4 + d;
        var total = 0.0;
        var a = vec4<f32>(0.0);
        for (var s = 0u; s < SPLIT; s += 4u) {
            let w = array<vec2<f32>, 4>(chunk_weight(g, s), chunk_weight(g, s + 1u), chunk_weight(g, s + 2u),
                                        chunk_weight(g, s + 3u));
            let e = exp(vec4<f32>(w[0].x, w[1].x, w[2].x, w[3].x) - mx);
            total += dot(e, vec4<f32>(w[0].y, w[1].y, w[2].y, w[3].y));
            // chunks past SPLIT re-read the last one with weight 0
            a += e.x * partials[at + s * REC4] + e.y * partials[at + min(s + 1u, SPLIT - 1u) * REC4]
                + e.z * partials[at + min(s + 2u, SPLIT - 1u) * REC4] + e.w * partials[at + min(s + 3u, SPLIT - 1u) * REC4];
        }
        out[t * QW4 + (head0 + g) * HD4 + d] = a / total;
    }
}

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    if u32(slots[wid.y]) - SLOT0 >= N_SLOTS {  // another slot group's token (uniform: one token a workgroup)
        return;
    }
    attend(wid, lid);
    if SPLIT > 1u {
        // Publish this chunk's partials, then count it in; the last one in sees every chunk's.
        storageBarrier();
        let counter = wid.y * NKV * BLOCKS + wid.z;
        if lid == 0u {
            last_chunk = atomicAdd(&arrived[counter], 1u) == SPLIT - 1u;
        }
        if workgroupUniformLoad(&last_chunk) {
            storageBarrier();
            merge(wid.y, wid.z / BLOCKS * G + (wid.z % BLOCKS) * HB, lid);
            if lid == 0u {
                atomicStore(&arrived[counter], 0u);  // ready for the next layer and step
            }
        }
    }
}
