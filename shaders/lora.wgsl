// LoRA side paths of one weight (realm_wasm/lora.py): y[t, n] += sum_j B_j[n] · u_j[t] over the
// adapters j of token t, beside the quantized weight, never merged into it, where u_j[t] = s_j *
// A_j · x[t] (lora_ax.wgsl): an output row costs LORA_RANK multiply-adds per adapter. The mat-vec
// calls `lora_row` (lora_matvec.wgsl) with u it computed itself in workgroup memory; after a
// mat-mat, lora_main.wgsl does, with u the group's A·x kernel computed for the step. Each of
// them defines `lora_u(t, j, p, i)`: the i-th vec4 of u[t][j][p], and `lora_r4(j, slot, p)`: the
// vec4s of rank of part p of the adapter in column j (`slot`; 0 for none).
//
// The weight is part LORA_PART0 of its group (lora_tokens.wgsl has the buffer's layout), or, joined
// (q and k, a GLU's gate and up), parts LORA_PART0 and LORA_PART0 + 1: its rows from LORA_SPLIT on
// are the second's. Its B rows start at row LORA_ROW0 of the group's B.
// Consts: lora_tokens.wgsl's, LORA_PART0, LORA_P (1 or 2), LORA_N (the weight's rows, both parts),
// LORA_SPLIT (first row of the second part; LORA_N with one part), LORA_ROW0.

@group(0) @binding(LORA_AT + 1u) var<storage, read> lora_side: array<vec4<f32>>;

// Lane `lane` of `lanes`' share of output row n's side paths: every lanes-th vec4 of
// B_j[n] · u_j, over the token's adapters j (the lanes' shares add up to the row's).
fn lora_row(t: u32, n: u32, lane: u32, lanes: u32) -> f32 {
    let token = lora_tokens[t];
    let p = LORA_PART0 + select(0u, 1u, n >= LORA_SPLIT);
    var sum = 0.0;
    for (var j = 0u; j < 4u; j++) {
        let slot = token.slots[j];
        let r4 = lora_r4(j, slot, p);
        let b = LORA_RANKS4 + (u32(max(slot, 0)) * LORA_N_ALL + LORA_ROW0 + n) * LORA_R4;
        for (var i = lane; i < r4; i += lanes) {
            sum += dot(lora_side[b + i], lora_u(t, j, p, i));
        }
    }
    return sum;
}
