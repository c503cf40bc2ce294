// Prefill / batch mat-mat: y[t, ROW0 + n] = sum_k W[n, k] * x[t, k] for t < T (T = params.x, the
// step's row count) and the N rows of one weight binding.
// A workgroup owns a TN x TT tile of outputs. Per BK-wide slice of K it dequantizes the TN x BK
// weight tile into workgroup memory once (one 8-element group per thread per pass; neighbouring
// threads read along a row), stages the
// TT x BK slice of x beside it, and every thread accumulates an RN x RT register tile from them.
// Thread (a, b) owns rows a + i * (TN / RN) and tokens b + j * (TT / RT): neighbouring threads
// touch neighbouring workgroup-memory words and neighbouring outputs.
// Products within one slice are summed in F (f16 when enabled), slices are summed in f32.
// Consts: K, N, TN, TT, RN, RT, BK, GRID_X, Y_STRIDE, ROW0.

@group(0) @binding(1) var<storage, read> x: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;
@group(0) @binding(3) var<uniform> params: vec4<u32>;

const GROUPS_PER_BLOCK: u32 = QK / 8u;
const ROW_BYTES: u32 = K / QK * BLOCK_BYTES;
const THREADS_N: u32 = TN / RN;
const THREADS_T: u32 = TT / RT;
const WG: u32 = THREADS_N * THREADS_T;

var<workgroup> w_tile: array<F, BK * TN>;  // [k][n]
var<workgroup> x_tile: array<F, BK * TT>;  // [k][t]

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let T = params.x;
    let n0 = (wid.y * GRID_X + wid.x) * TN;
    let t0 = wid.z * TT;
    let a = lid % THREADS_N;
    let b = lid / THREADS_N;
    var acc: array<f32, RN * RT>;
    var part: array<F, RN * RT>;  // this slice's sums, flushed into acc (Naga hoists loop-body vars)
    for (var k0 = 0u; k0 < K; k0 += BK) {
        for (var i = lid; i < TN * BK / 8u; i += WG) {
            let n = i / (BK / 8u);
            let kk = 8u * (i % (BK / 8u));
            let k = k0 + kk;
            let blk = min(n0 + n, N - 1u) * ROW_BYTES + k / QK * BLOCK_BYTES;
            let q = dequant8(blk, k % QK / 8u);
            for (var e = 0u; e < 4u; e++) {
                w_tile[(kk + e) * TN + n] = q.lo[e];
                w_tile[(kk + e + 4u) * TN + n] = q.hi[e];
            }
        }
        for (var i = lid; i < TT * BK / 4u; i += WG) {
            let t = i / (BK / 4u);
            let kk = 4u * (i % (BK / 4u));
            let v = vec4<F>(x[(min(t0 + t, T - 1u) * K + k0 + kk) / 4u]);
            for (var e = 0u; e < 4u; e++) {
                x_tile[(kk + e) * TT + t] = v[e];
            }
        }
        workgroupBarrier();
        for (var kk = 0u; kk < BK; kk++) {
            var wv: array<F, RN>;
            for (var i = 0u; i < RN; i++) {
                wv[i] = w_tile[kk * TN + a + i * THREADS_N];
            }
            for (var j = 0u; j < RT; j++) {
                let xv = x_tile[kk * TT + b + j * THREADS_T];
                for (var i = 0u; i < RN; i++) {
                    part[i * RT + j] = fma(wv[i], xv, part[i * RT + j]);
                }
            }
        }
        for (var i = 0u; i < RN * RT; i++) {
            acc[i] += f32(part[i]);
            part[i] = F(0.0);
        }
        workgroupBarrier();
    }
    for (var i = 0u; i < RN; i++) {
        let n = n0 + a + i * THREADS_N;
        for (var j = 0u; j < RT; j++) {
            let t = t0 + b + j * THREADS_T;
            if n < N && t < T {
                y[t * Y_STRIDE + ROW0 + n] = acc[i * RT + j];
            }
        }
    }
}
