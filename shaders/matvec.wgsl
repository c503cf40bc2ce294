// Decode mat-vec: y[t, ROW0 + n] = sum_k W[n, k] * x[t, k] for the N rows of one weight binding.
// A workgroup owns R consecutive rows of token t = workgroup_id.z. Its WG threads stride along K
// one 8-element group at a time (neighbouring threads read neighbouring bytes) and keep R partial
// sums in registers, reusing each x load for all R rows; one workgroup_sum finishes the rows.
// Consts: K, N, R, WG, GRID_X (workgroups per grid row: big N folds into y), Y_STRIDE, ROW0.

@group(0) @binding(1) var<storage, read> x: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;

const GROUPS_PER_BLOCK: u32 = QK / 8u;
const ROW_BYTES: u32 = K / QK * BLOCK_BYTES;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, lane: Lane) {
    let first = (wid.y * GRID_X + wid.x) * R;
    let t = wid.z;
    var acc: array<f32, R>;
    for (var gi = lane.index; gi < K / 8u; gi += WG) {
        let xi = (t * K + 8u * gi) / 4u;
        let xlo = vec4<F>(x[xi]);
        let xhi = vec4<F>(x[xi + 1u]);
        let blk = gi / GROUPS_PER_BLOCK * BLOCK_BYTES;
        for (var r = 0u; r < R; r++) {
            // Rows past N (last workgroup) re-read row N-1; their sums are never written.
            let q = dequant8(min(first + r, N - 1u) * ROW_BYTES + blk, gi % GROUPS_PER_BLOCK);
            acc[r] += f32(dot(q.lo, xlo) + dot(q.hi, xhi));
        }
    }
    let total = workgroup_sum(lane, acc);
    if lane.index < R && first + lane.index < N {
        y[t * Y_STRIDE + ROW0 + first + lane.index] = total;
    }
}
