// A·x of a LoRA input group (lora_tokens.wgsl) in a step that runs the mat-mat, once for all the
// weights that read x: u[t][j][p] = s_j * A_jp · x[t] for token t = workgroup_id.z, adapter column
// j = workgroup_id.y and the parts' rows, 4 rows of one part per team of LANES invocations
// (lora_ax4; lanes_sum adds the lanes' shares up). The LoRA kernel after each mat-mat then only
// adds B·u (lora_main.wgsl). A column without an adapter does nothing.
// Consts: K, WG, LANES, lora_tokens.wgsl's (LORA_AT = 2), reduce_lanes_*.wgsl's.

@group(0) @binding(0) var<storage, read> x: array<vec4<f32>>;
@group(0) @binding(1) var<storage, read_write> lora_side: array<vec4<f32>>;

const TEAMS: u32 = WG / LANES;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, lane: Lane) {
    let t = wid.z;
    let j = wid.y;
    let slot = lora_tokens[t].slots[j];
    if slot < 0 {  // uniform: the whole workgroup serves one (token, column)
        return;
    }
    let quad = lora_quad(slot, wid.x * TEAMS + lane.index / LANES, 0u, LORA_GP);  // the team's rows
    var sum = vec4<f32>();
    if quad.working {
        sum = lora_ax4(u32(slot), quad.p, quad.i, t, lane.index % LANES);
    }
    let total = lanes_sum(lane, sum, 0u);
    if quad.working && lane.index % LANES == 0u {
        lora_side[lora_u_at(t, j, quad.p) + quad.i] = total * lora_tokens[t].scales[j];
    }
}
