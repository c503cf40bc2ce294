// LoRA side paths of one weight (realm_wasm/lora.py): y[t, n] += sum_j s_j * B_j[n] · (A_j · x[t]) over
// the adapters j of token t, beside the quantized weight, never merged into it. A workgroup serves
// one token: `lora_prepare` puts s_j * A_j · x[t] of the token's adapters into workgroup memory
// (rank x K multiply-adds each, shared by all the workgroup's rows), then `lora_row` gives an
// output row's B_j[n] · u_j. The mat-vec calls both (lora_matvec.wgsl); after a mat-mat,
// lora_main.wgsl does.
//
// A joined weight (q and k, or a GLU's gate and up) has two parts, each with its own A and B:
// rows from LORA_SPLIT on are part 1. Everything lives in one read-only buffer of vec4s (`lora_w`):
//     ranks  [LORA_SLOTS][LORA_P] f32       rank of each slot's part, rounded up to 4 (0: not adapted)
//     A      [LORA_SLOTS][LORA_P][LORA_RANK][K]      rows past the rank are 0
//     B      [LORA_SLOTS][LORA_N][LORA_RANK]         columns past the rank are 0
// and each token's (up to 4) adapter slots and scales are a uniform table (`lora_tokens`).
// Needs `x` ([T, K] as vec4s) and consts K, WG from the kernel it is composed with.
// Consts: LORA_AT (first binding), LORA_T (tokens the table holds), LORA_SLOTS, LORA_P (1 or 2),
// LORA_N (weight rows, both parts), LORA_SPLIT (first row of part 1; LORA_N with one part),
// LORA_RANK (a multiple of 4).

struct LoraToken {
    slots: vec4<i32>,  // adapter slots, -1: none
    scales: vec4<f32>,
}

@group(0) @binding(LORA_AT) var<uniform> lora_tokens: array<LoraToken, LORA_T>;
@group(0) @binding(LORA_AT + 1u) var<storage, read> lora_w: array<vec4<f32>>;

const LORA_K4: u32 = K / 4u;
const LORA_R4: u32 = LORA_RANK / 4u;
const LORA_PAIRS: u32 = 4u * LORA_P;  // (adapter column, part) pairs of a token
const LORA_A_AT: u32 = (LORA_SLOTS * LORA_P + 3u) / 4u;
const LORA_B_AT: u32 = LORA_A_AT + LORA_SLOTS * LORA_P * LORA_RANK * LORA_K4;
const LORA_TEAM_MAX: u32 = 32u;

var<workgroup> lora_u: array<f32, LORA_PAIRS * LORA_RANK>;  // [column][part][rank]: s_j * A_jp · x[t]
var<workgroup> lora_partial: array<f32, WG>;

// Rows of A (the rank, rounded up to 4) of part p of the adapter in `slot`; 0 for none.
fn lora_rows(slot: i32, p: u32) -> u32 {
    if slot < 0 {
        return 0u;
    }
    let i = u32(slot) * LORA_P + p;
    return u32(lora_w[i / 4u][i % 4u]);
}

fn lora_any(t: u32) -> bool {
    return any(lora_tokens[t].slots >= vec4<i32>(0));
}

// u = s_j * A_jp · x[t] for every adapter column j and part p of token t. Teams of threads (as
// many as the workgroup has for the rows of u, up to LORA_TEAM_MAX) each sum one row, in turns of
// WG / team rows. Call from uniform control flow, before the first `lora_row`.
fn lora_prepare(t: u32, lid: u32) {
    let token = lora_tokens[t];
    var rows: array<u32, LORA_PAIRS>;
    var total = 0u;
    for (var jp = 0u; jp < LORA_PAIRS; jp++) {
        rows[jp] = lora_rows(token.slots[jp / LORA_P], jp % LORA_P);
        total += rows[jp];
    }
    if total == 0u {
        return;
    }
    var span = 1u;  // total rounded up to a power of two
    while span < total {
        span <<= 1u;
    }
    let team = clamp(WG / span, 1u, LORA_TEAM_MAX);
    let member = lid % team;
    for (var first = 0u; first < total; first += WG / team) {
        let q = first + lid / team;  // the row of u this thread helps with, counted over the token's rows
        var at = 0u;
        var sum = 0.0;
        if q < total {
            var jp = 0u;
            var r = q;
            while r >= rows[jp] {
                r -= rows[jp];
                jp++;
            }
            let j = jp / LORA_P;
            let a = LORA_A_AT + ((u32(token.slots[j]) * LORA_P + jp % LORA_P) * LORA_RANK + r) * LORA_K4;
            for (var k = member; k < LORA_K4; k += team) {
                sum += dot(lora_w[a + k], x[t * LORA_K4 + k]);
            }
            sum *= token.scales[j];
            at = jp * LORA_RANK + r;
        }
        lora_partial[lid] = sum;
        workgroupBarrier();
        if q < total && member == 0u {
            var row = 0.0;
            for (var i = 0u; i < team; i++) {
                row += lora_partial[lid + i];
            }
            lora_u[at] = row;
        }
        workgroupBarrier();
    }
}

// Lane `lane` of `lanes`' share of output row n's side paths: every lanes-th vec4 of
// B_j[n] · u_j, over the token's adapters j (the lanes' shares add up to the row's).
fn lora_row(t: u32, n: u32, lane: u32, lanes: u32) -> f32 {
    let token = lora_tokens[t];
    let p = select(0u, 1u, n >= LORA_SPLIT);
    var sum = 0.0;
    for (var j = 0u; j < 4u; j++) {
        let slot = token.slots[j];
        let r4 = lora_rows(slot, p) / 4u;
        let b = LORA_B_AT + (u32(max(slot, 0)) * LORA_N + n) * LORA_R4;
        let u = (j * LORA_P + p) * LORA_RANK;
        for (var i = lane; i < r4; i += lanes) {
            let ui = u + 4u * i;
            sum += dot(lora_w[b + i], vec4<f32>(lora_u[ui], lora_u[ui + 1u], lora_u[ui + 2u], lora_u[ui + 3u]));
        }
    }
    return sum;
}
