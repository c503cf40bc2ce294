// Prefill / batch mat-mat: y[t, ROW0 + n] = sum_k W[n, k] * x[t, k] for t < T (T = params.x, the
// step's row count) and the N rows of one weight binding.
// A workgroup owns a TN x TT tile of outputs and walks K in BK-wide slices. Per slice it
// dequantizes the TN x BK weight tile into workgroup memory once and stages the TT x BK slice of x
// beside it, both as vec4s across four rows (tokens) at one k. Each thread owns RN x RT outputs
// (RN, RT = 4 or 8) as up to 2 x 2 blocks of 4 rows x 4 tokens: per k it reads one or two vec4s of
// each tile and does rank-1 updates of its blocks. Block (i, j) holds row quad a + i * THREADS_N and
// token quad b + j * THREADS_T, so neighbouring threads read neighbouring vec4s.
// Registers are indexed by constants only: drivers do not unroll Naga's loops (each carries a
// loop-bounding counter), and a register array indexed in a loop would live in memory.
// Up to 32 products are summed in F (f16 when enabled), those sums in f32.
// Consts: K, N, TN, TT, RN, RT, BK, GRID_X, ROW0 (TN, TT multiples of RN, RT; BK of 8) and
// rows_out.wgsl's (where rows land in y).

@group(0) @binding(1) var<storage, read> x: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;
@group(0) @binding(3) var<uniform> params: vec4<u32>;

const ROW_BYTES: u32 = K / QK * BLOCK_BYTES;
const THREADS_N: u32 = TN / RN;
const THREADS_T: u32 = TT / RT;
const WG: u32 = THREADS_N * THREADS_T;
// Tile rows in vec4s, one longer than needed: the staging stores of k rows 4 or 8 apart then
// spread over the banks instead of piling onto the same ones.
const WS: u32 = TN / 4u + 1u;
const XS: u32 = TT / 4u + 1u;
// Products summed in F before they go into the f32 totals (f16 keeps ~3 digits: 32 terms at most).
const FLUSH: u32 = min(BK, 32u);

var<workgroup> w_tile: array<vec4<F>, BK * WS>;  // [k][n / 4]: rows 4q .. 4q+3 at one k
var<workgroup> x_tile: array<vec4<F>, BK * XS>;  // [k][t / 4]

// The thread's blocks, column c = token c of the quad: sums of the last FLUSH k (p), totals (s).
var<private> p00: mat4x4<F>;
var<private> p01: mat4x4<F>;
var<private> p10: mat4x4<F>;
var<private> p11: mat4x4<F>;
var<private> s00: mat4x4<f32>;
var<private> s01: mat4x4<f32>;
var<private> s10: mat4x4<f32>;
var<private> s11: mat4x4<f32>;

// Elements k .. k+7 of weight row n (k a multiple of 8). Rows past N re-read row N - 1 and tokens
// past T re-read token T - 1: their outputs are never written.
fn weight8(n: u32, k: u32) -> Dq8 {
    return dequant8(min(n, N - 1u) * ROW_BYTES + k / QK * BLOCK_BYTES, k % QK / 8u);
}

fn x4(t: u32, k: u32) -> vec4<F> {
    return vec4<F>(x[(min(t, params.x - 1u) * K + k) / 4u]);
}

// Columns of m (four rows or tokens at one k each) into four consecutive k rows of a tile.
fn put_w(at: u32, m: mat4x4<F>) {
    w_tile[at] = m[0];
    w_tile[at + WS] = m[1];
    w_tile[at + 2u * WS] = m[2];
    w_tile[at + 3u * WS] = m[3];
}

fn put_x(at: u32, m: mat4x4<F>) {
    x_tile[at] = m[0];
    x_tile[at + XS] = m[1];
    x_tile[at + 2u * XS] = m[2];
    x_tile[at + 3u * XS] = m[3];
}

// p + w * x^T: four rows by four tokens.
fn outer(p: mat4x4<F>, w: vec4<F>, xv: vec4<F>) -> mat4x4<F> {
    return mat4x4<F>(fma(w, vec4<F>(xv.x), p[0]), fma(w, vec4<F>(xv.y), p[1]),
                     fma(w, vec4<F>(xv.z), p[2]), fma(w, vec4<F>(xv.w), p[3]));
}

fn widen_add(s: mat4x4<f32>, p: mat4x4<F>) -> mat4x4<f32> {
    return s + mat4x4<f32>(vec4<f32>(p[0]), vec4<f32>(p[1]), vec4<f32>(p[2]), vec4<f32>(p[3]));
}

// One k of the slice for thread (a, b); the second row / token quads only where RN / RT are 8
// (constant conditions: the compiler drops the unused code).
fn k_step(k: u32, a: u32, b: u32) {
    let w0 = w_tile[k * WS + a];
    let x0 = x_tile[k * XS + b];
    p00 = outer(p00, w0, x0);
    if RT == 8u {
        p01 = outer(p01, w0, x_tile[k * XS + b + THREADS_T]);
    }
    if RN == 8u {
        let w1 = w_tile[k * WS + a + THREADS_N];
        p10 = outer(p10, w1, x0);
        if RT == 8u {
            p11 = outer(p11, w1, x_tile[k * XS + b + THREADS_T]);
        }
    }
}

// The last FLUSH k's sums into the totals.
fn flush() {
    s00 = widen_add(s00, p00);
    p00 = mat4x4<F>();
    if RT == 8u {
        s01 = widen_add(s01, p01);
        p01 = mat4x4<F>();
    }
    if RN == 8u {
        s10 = widen_add(s10, p10);
        p10 = mat4x4<F>();
        if RT == 8u {
            s11 = widen_add(s11, p11);
            p11 = mat4x4<F>();
        }
    }
}

// Block s, whose first row is n0 and first token t0, into y (the loops run once per thread).
fn store(s: mat4x4<f32>, n0: u32, t0: u32) {
    for (var c = 0u; c < 4u; c++) {
        let t = t0 + c;
        for (var r = 0u; r < 4u; r++) {
            if t < params.x && n0 + r < N {
                y[out_index(t, ROW0 + n0 + r)] = s[c][r];
            }
        }
    }
}

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let n0 = (wid.y * GRID_X + wid.x) * TN;
    let t0 = wid.z * TT;
    let a = lid % THREADS_N;
    let b = lid / THREADS_N;
    for (var k0 = 0u; k0 < K; k0 += BK) {
        // Weights: item (row quad q, group g) dequantizes 8 k of four rows and stores them
        // transposed; neighbouring items read neighbouring bytes of the same rows.
        for (var i = lid; i < TN * BK / 32u; i += WG) {
            let q = i / (BK / 8u);
            let g = i % (BK / 8u);
            let n = n0 + 4u * q;
            let k = k0 + 8u * g;
            let q0 = weight8(n, k);
            let q1 = weight8(n + 1u, k);
            let q2 = weight8(n + 2u, k);
            let q3 = weight8(n + 3u, k);
            put_w(8u * g * WS + q, transpose(mat4x4<F>(q0.lo, q1.lo, q2.lo, q3.lo)));
            put_w((8u * g + 4u) * WS + q, transpose(mat4x4<F>(q0.hi, q1.hi, q2.hi, q3.hi)));
        }
        // x: item (token quad, k quad) likewise; neighbouring items read along a token's row.
        for (var i = lid; i < TT * BK / 16u; i += WG) {
            let q = i / (BK / 4u);
            let kq = i % (BK / 4u);
            let t = t0 + 4u * q;
            let k = k0 + 4u * kq;
            put_x(4u * kq * XS + q, transpose(mat4x4<F>(x4(t, k), x4(t + 1u, k), x4(t + 2u, k), x4(t + 3u, k))));
        }
        workgroupBarrier();
        for (var k1 = 0u; k1 < BK; k1 += FLUSH) {
            for (var kk = k1; kk < k1 + FLUSH; kk += 4u) {
                k_step(kk, a, b);
                k_step(kk + 1u, a, b);
                k_step(kk + 2u, a, b);
                k_step(kk + 3u, a, b);
            }
            flush();
        }
        workgroupBarrier();
    }
    let n = n0 + 4u * a;
    let t = t0 + 4u * b;
    store(s00, n, t);
    if RT == 8u {
        store(s01, n, t + 4u * THREADS_T);
    }
    if RN == 8u {
        store(s10, n + 4u * THREADS_N, t);
        if RT == 8u {
            store(s11, n + 4u * THREADS_N, t + 4u * THREADS_T);
        }
    }
}
