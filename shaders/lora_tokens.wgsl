// LoRA's per-step token table and the layout of an input group's buffers (realm_wasm/gpu/lora.py),
// shared by the A·x kernel (lora_shrink.wgsl) and the B·u side (lora.wgsl).
//
// The weights that read one input x (a layer's q, k and v; or gate and up) form a group of
// LORA_GP parts, each with its own A and B; a weight's kernel holds one part, or two adjacent
// ones (a joined q + k, a GLU's gate + up). Each group has two read-only-to-kernels buffers of vec4s:
//     lora_a     ranks [LORA_SLOTS][LORA_GP] f32 (rank of each slot's part, rounded up to 4; 0: not
//                adapted), then A [LORA_SLOTS][LORA_GP][LORA_RANK][K] (rows past the rank are 0)
//     lora_side  the same ranks, then B [LORA_SLOTS][LORA_N_ALL][LORA_RANK] (columns past the rank
//                are 0), then u [LORA_T][4][LORA_GP][LORA_RANK]: s_j * A_jp · x[t] for each token t,
//                adapter column j and part p, which the A·x kernel writes once per step
// and each token's (up to 4) adapter slots and scales are a uniform table (`lora_tokens`).
// Consts: LORA_AT (the table's binding), LORA_T (tokens the table holds), LORA_SLOTS, LORA_GP,
// LORA_N_ALL (B rows of all the group's parts), LORA_RANK (a multiple of 4).

struct LoraToken {
    slots: vec4<i32>,  // adapter slots, -1: none
    scales: vec4<f32>,
}

@group(0) @binding(LORA_AT) var<uniform> lora_tokens: array<LoraToken, LORA_T>;

const LORA_R4: u32 = LORA_RANK / 4u;
const LORA_RANKS4: u32 = (LORA_SLOTS * LORA_GP + 3u) / 4u;  // vec4s of ranks before A or B
const LORA_U_AT: u32 = LORA_RANKS4 + LORA_SLOTS * LORA_N_ALL * LORA_R4;  // u in lora_side

fn lora_any(t: u32) -> bool {
    return any(lora_tokens[t].slots >= vec4<i32>(0));
}

// The first vec4 of u[t][j][p] in lora_side.
fn lora_u_at(t: u32, j: u32, p: u32) -> u32 {
    return LORA_U_AT + ((t * 4u + j) * LORA_GP + p) * LORA_R4;
}
