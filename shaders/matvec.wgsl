// Decode mat-vec: y[t, ROW0 + n] = W[n] · x[t] for the N rows of one weight binding; with GLU,
// y[t, n] = glu(W[n] · x[t], W[N + n] · x[t]) (glu_act.wgsl) for a weight of N gate rows, then N up.
// Token t = workgroup_id.x: the workgroups of all a step's tokens for the same rows run side by
// side, so a weight too big for L2 (an output head) is read from memory once per step, not per token.
//
// A team of LANES consecutive invocations owns R consecutive output rows. Each iteration a team
// takes 2 * LANES groups of 8 elements, two per lane: neighbouring groups where a block has
// several (their dequants share the block's scale loads), else groups LANES apart (neighbouring
// lanes then read neighbouring bytes). Each x load serves all the team's rows. lanes_sum
// (reduce_lanes_*.wgsl) adds up the lanes' sums; the team's first lane writes them.
// A thread's sums live in two vec4s indexed only by constants, rows 0-3 in `lo` and rows 4-7 (or,
// with GLU, the up rows of rows 0-3) in `hi`: an array indexed in a loop lands in local memory on
// NVIDIA (Naga's loop guards stop the driver unrolling, gfx-rs/wgpu#7698).
// LoRA: the hook lora_add (lora_matvec.wgsl with lora.wgsl, or lora_off.wgsl) adds the token's
// adapters' side paths to the sums before they are reduced.
// Consts: K, N, R (1-8, 1-4 with GLU), LANES, WG, GLU, GRID_X (workgroups per grid row: big N folds
// into y), ROW0, GELU for glu_act.wgsl and rows_out.wgsl's (where rows land in y).

@group(0) @binding(1) var<storage, read> x: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;

const GROUPS: u32 = K / 8u;
const GROUPS_PER_BLOCK: u32 = QK / 8u;
const ROW_BYTES: u32 = K / QK * BLOCK_BYTES;
const TEAMS: u32 = WG / LANES;
const LO: u32 = min(R, 4u);  // sums in lo
const HI: u32 = select(R - LO, R, GLU);  // sums in hi
const SPLIT: u32 = select(LANES, 1u, GROUPS_PER_BLOCK > 1u);  // a lane's second group, after its first
const CHUNK: u32 = 2u * LANES;  // groups a team takes per iteration
const WHOLE: u32 = GROUPS / CHUNK * CHUNK;  // groups in whole chunks

struct Sums {
    lo: vec4<f32>,
    hi: vec4<f32>,
}

struct Rows {  // first bytes of the weight rows summed in lo and hi
    lo: vec4<u32>,
    hi: vec4<u32>,
}

// Elements 8gi .. 8gi+7 of x[t].
fn x8(t: u32, gi: u32) -> Dq8 {
    let i = 2u * (t * GROUPS + gi);
    return Dq8(vec4<F>(x[i]), vec4<F>(x[i + 1u]));
}

fn group_dot(row: u32, gi: u32, xg: Dq8) -> f32 {
    let q = dequant8(row + gi / GROUPS_PER_BLOCK * BLOCK_BYTES, gi % GROUPS_PER_BLOCK);
    return f32(dot(q.lo, xg.lo) + dot(q.hi, xg.hi));
}

// Group gi of the first `count` rows of `rows` (a constant after inlining; the rest stay 0).
fn rows_dot(rows: vec4<u32>, count: u32, gi: u32, xg: Dq8) -> vec4<f32> {
    var s = vec4<f32>(group_dot(rows.x, gi, xg), 0.0, 0.0, 0.0);
    if count > 1u {
        s.y = group_dot(rows.y, gi, xg);
    }
    if count > 2u {
        s.z = group_dot(rows.z, gi, xg);
    }
    if count > 3u {
        s.w = group_dot(rows.w, gi, xg);
    }
    return s;
}

fn add_group(acc: ptr<function, Sums>, rows: Rows, t: u32, gi: u32) {
    let xg = x8(t, gi);
    (*acc).lo += rows_dot(rows.lo, LO, gi, xg);
    if HI > 0u {
        (*acc).hi += rows_dot(rows.hi, HI, gi, xg);
    }
}

fn store(t: u32, first: u32, r: u32, value: f32) {
    if r < R && first + r < N {
        y[out_index(t, ROW0 + first + r)] = value;
    }
}

// The rows of workgroup `wid`. The entry point (matvec_main.wgsl, or matvec_norm.wgsl which adds
// a residual RMSNorm after it) is composed after this file.
fn matvec(wid: vec3<u32>, lane: Lane) {
    let t = wid.x;
    let first = ((wid.z * GRID_X + wid.y) * TEAMS + lane.index / LANES) * R;
    // Rows past N (last workgroup) re-read row N-1; their sums are never written.
    let i = vec4<u32>(0u, 1u, 2u, 3u);
    let lo_n = min(vec4<u32>(first) + i, vec4<u32>(N - 1u));
    let hi_n = select(min(vec4<u32>(first + 4u) + i, vec4<u32>(N - 1u)), lo_n + N, GLU);
    let rows = Rows(lo_n * ROW_BYTES, hi_n * ROW_BYTES);
    var acc = Sums(vec4<f32>(), vec4<f32>());
    let li = lane.index % LANES;
    let g = select(li, 2u * li, SPLIT == 1u);  // the lane's first group in a chunk
    for (var c = 0u; c < WHOLE; c += CHUNK) {
        add_group(&acc, rows, t, c + g);
        add_group(&acc, rows, t, c + g + SPLIT);
    }
    if WHOLE + g < GROUPS {
        add_group(&acc, rows, t, WHOLE + g);
    }
    if WHOLE + g + SPLIT < GROUPS {
        add_group(&acc, rows, t, WHOLE + g + SPLIT);
    }
    lora_add(&acc, t, lo_n + ROW0, hi_n + ROW0, li);
    let lo = lanes_sum(lane, acc.lo, 0u);
    var hi = vec4<f32>();
    if HI > 0u {
        hi = lanes_sum(lane, acc.hi, 1u);
    }
    var out = Sums(lo, hi);
    if GLU {  // R <= 4: the up sums in hi are not stored
        out.lo = vec4<f32>(glu(lo.x, hi.x), glu(lo.y, hi.y), glu(lo.z, hi.z), glu(lo.w, hi.w));
    }
    if li == 0u {
        store(t, first, 0u, out.lo.x);
        store(t, first, 1u, out.lo.y);
        store(t, first, 2u, out.lo.z);
        store(t, first, 3u, out.lo.w);
        store(t, first, 4u, out.hi.x);
        store(t, first, 5u, out.hi.y);
        store(t, first, 6u, out.hi.z);
        store(t, first, 7u, out.hi.w);
    }
}
