// LoRA's per-step token table and the layout of an input group's buffer (realm_wasm/gpu/lora.py),
// shared by the A·x side (lora_ax.wgsl) and the B·u side (lora.wgsl).
//
// The weights that read one input x (a layer's q, k and v; or gate and up) form a group of
// LORA_GP parts, each with its own A and B; a weight's kernel holds one part, or two adjacent
// ones (a joined q + k, a GLU's gate + up). Each group has one buffer of vec4s, `lora_side`
// (read-only to every kernel but the group's A·x kernel, which writes u; each kernel declares it):
//     ranks [LORA_SLOTS][LORA_GP] f32 (rank of each slot's part, rounded up to 4; 0: not adapted)
//     B     [LORA_SLOTS][LORA_N_ALL][LORA_RANK] (columns past the rank are 0)
//     u     [LORA_T][4][LORA_GP][LORA_RANK]: s_j * A_jp · x[t] for each token t, adapter column j and
//           part p, written by the A·x kernel in steps that run the mat-mat (a mat-vec computes
//           its token's u itself, lora_matvec.wgsl)
//     A     [LORA_SLOTS][LORA_GP][LORA_RANK][K] (rows past the rank are 0)
// and each token's (up to 4) adapter slots and scales are a uniform table (`lora_tokens`).
// Consts: LORA_AT (the table's binding), LORA_T (tokens the table holds), LORA_SLOTS, LORA_GP,
// LORA_N_ALL (B rows of all the group's parts), LORA_RANK (a multiple of 4).

struct LoraToken {
    slots: vec4<i32>,  // adapter slots, -1: none
    scales: vec4<f32>,
}

@group(0) @binding(LORA_AT) var<uniform> lora_tokens: array<LoraToken, LORA_T>;

const LORA_R4: u32 = LORA_RANK / 4u;
const LORA_RANKS4: u32 = (LORA_SLOTS * LORA_GP + 3u) / 4u;  // vec4s of ranks before B
const LORA_U_AT: u32 = LORA_RANKS4 + LORA_SLOTS * LORA_N_ALL * LORA_R4;  // u in lora_side
const LORA_A_AT: u32 = LORA_U_AT + LORA_T * 4u * LORA_GP * LORA_R4;  // A in lora_side

fn lora_any(t: u32) -> bool {
    return any(lora_tokens[t].slots >= vec4<i32>(0));
}

// Rows of A (the rank, rounded up to 4) of group part p of the adapter in `slot`; 0 for none.
fn lora_rows(slot: i32, p: u32) -> u32 {
    if slot < 0 {
        return 0u;
    }
    let i = u32(slot) * LORA_GP + p;
    return u32(lora_side[i / 4u][i % 4u]);
}

// The first vec4 of u[t][j][p] in lora_side.
fn lora_u_at(t: u32, j: u32, p: u32) -> u32 {
    return LORA_U_AT + ((t * 4u + j) * LORA_GP + p) * LORA_R4;
}
