// Decode mat-vec: y[t, ROW0 + n] = W[n] · x[t] for the N rows of one weight binding; with GLU,
// y[t, n] = glu(W[n] · x[t], W[N + n] · x[t]) (glu_act.wgsl) for a weight of N gate rows, then N up.
// Token t = workgroup_id.x: the workgroups of all a step's tokens for the same rows run side by
// side, so a weight too big for L2 (an output head) is read from memory once per step, not per token.
//
// A team of LANES consecutive invocations owns R consecutive output rows. How a team walks K is
// composed before this file: `walk(rows, t, lid)` returns the lane's partial sums of its team's rows
// (matvec_groups.wgsl: 8-element groups through the type's dequant8; matvec_chunks.wgsl: 16-byte
// chunks of super-blocks against x quantized to int8). lanes_sum (reduce_lanes_*.wgsl) adds up the
// lanes' sums; the team's first lane writes them.
// A thread's sums live in two vec4s indexed only by constants, rows 0-3 in `lo` and rows 4-7 (or,
// with GLU, the up rows of rows 0-3) in `hi`: an array indexed in a loop lands in local memory on
// NVIDIA (Naga's loop guards stop the driver unrolling, gfx-rs/wgpu#7698).
// LoRA: the hooks (lora_matvec.wgsl with lora.wgsl and lora_ax.wgsl, or lora_off.wgsl) compute
// the token's u = A·x first (lora_begin) and add its adapters' side paths B·u to the sums before
// they are reduced (lora_add).
// Consts: K, N, R (1-8, 1-4 with GLU), LANES, WG, GLU, GRID_X (workgroups per grid row: big N folds
// into y), ROW0, GELU for glu_act.wgsl and rows_out.wgsl's (where rows land in y).

@group(0) @binding(1) var<storage, read> x: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;

const ROW_BYTES: u32 = K / QK * BLOCK_BYTES;
const TEAMS: u32 = WG / LANES;
const LO: u32 = min(R, 4u);  // sums in lo
const HI: u32 = select(R - LO, R, GLU);  // sums in hi

struct Sums {
    lo: vec4<f32>,
    hi: vec4<f32>,
}

struct Rows {  // first bytes of the weight rows summed in lo and hi
    lo: vec4<u32>,
    hi: vec4<u32>,
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
    lora_begin(t, lane);
    let first = ((wid.z * GRID_X + wid.y) * TEAMS + lane.index / LANES) * R;
    // Rows past N (last workgroup) re-read row N-1; their sums are never written.
    let i = vec4<u32>(0u, 1u, 2u, 3u);
    let lo_n = min(vec4<u32>(first) + i, vec4<u32>(N - 1u));
    let hi_n = select(min(vec4<u32>(first + 4u) + i, vec4<u32>(N - 1u)), lo_n + N, GLU);
    let rows = Rows(lo_n * ROW_BYTES, hi_n * ROW_BYTES);
    var sums = walk(rows, t, lane.index);
    let li = lane.index % LANES;
    lora_add(&sums, t, lo_n + ROW0, hi_n + ROW0, li);
    let lo = lanes_sum(lane, sums.lo, 0u);
    var hi = vec4<f32>();
    if HI > 0u {
        hi = lanes_sum(lane, sums.hi, 1u);
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
