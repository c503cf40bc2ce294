// A·x of a LoRA input group (lora_tokens.wgsl), once per step for all the weights that read x:
// u[t][j][p] = s_j * A_jp · x[t] for token t = workgroup_id.z, adapter column j = workgroup_id.y and
// the parts' rows, 4 rows of one part per team of LANES invocations (each lane takes every
// LANES-th vec4 of K; lanes_sum adds them up). The weights' kernels then only add B·u (lora.wgsl),
// so no workgroup of theirs reads A. A column without an adapter does nothing.
// Consts: K, WG, LANES, lora_tokens.wgsl's (LORA_AT = 3), reduce_lanes_*.wgsl's.

@group(0) @binding(0) var<storage, read> x: array<vec4<f32>>;
@group(0) @binding(1) var<storage, read> lora_a: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read_write> lora_side: array<vec4<f32>>;

const K4: u32 = K / 4u;
const TEAMS: u32 = WG / LANES;

fn rank_of(slot: u32, p: u32) -> u32 {
    let i = slot * LORA_GP + p;
    return u32(lora_a[i / 4u][i % 4u]);
}

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, lane: Lane) {
    let t = wid.z;
    let j = wid.y;
    let slot = lora_tokens[t].slots[j];
    if slot < 0 {  // uniform: the whole workgroup serves one (token, column)
        return;
    }
    let q = wid.x * TEAMS + lane.index / LANES;  // the team's rows: part p, rows 4i .. 4i + 3
    let p = min(q / LORA_R4, LORA_GP - 1u);
    let i = q % LORA_R4;
    let working = q < LORA_GP * LORA_R4 && 4u * i < rank_of(u32(slot), p);
    var sum = vec4<f32>();
    if working {
        let a = LORA_RANKS4 + ((u32(slot) * LORA_GP + p) * LORA_RANK + 4u * i) * K4;
        for (var k = lane.index % LANES; k < K4; k += LANES) {
            let xk = x[t * K4 + k];
            sum += vec4<f32>(dot(lora_a[a + k], xk), dot(lora_a[a + K4 + k], xk), dot(lora_a[a + 2u * K4 + k], xk),
                             dot(lora_a[a + 3u * K4 + k], xk));
        }
    }
    let total = lanes_sum(lane, sum, 0u);
    if working && lane.index % LANES == 0u {
        lora_side[lora_u_at(t, j, p) + i] = total * lora_tokens[t].scales[j];
    }
}
