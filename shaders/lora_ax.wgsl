// A·x of the LoRA side paths (lora_tokens.wgsl has the layout): a lane's share of four rows of u.
// Called by the group's A·x kernel (lora_shrink.wgsl: steps that run the mat-mat, u for all the
// group's weights in one dispatch) and by the mat-vec itself (lora_matvec.wgsl: steps that run the
// mat-vec, each workgroup its token's u for its own weight, so the step has no dispatch more than
// without LoRA).
// The kernel declares x ([T][K / 4] vec4s) and lora_side. Consts: K (x's width), LANES.

const LORA_K4: u32 = K / 4u;

struct LoraQuad {
    p: u32,  // the group part
    i: u32,  // its rows 4i .. 4i + 3
    working: bool,  // a quad of the parts asked for, within the slot's rank
}

// Quad q of u over `parts` group parts from `part0` (LORA_R4 quads each), for the adapter in `slot`.
fn lora_quad(slot: i32, q: u32, part0: u32, parts: u32) -> LoraQuad {
    let p = part0 + min(q / LORA_R4, parts - 1u);
    let i = q % LORA_R4;
    return LoraQuad(p, i, q < parts * LORA_R4 && 4u * i < lora_rows(slot, p));
}

// Lane li's share (every LANES-th vec4 of K) of rows 4i .. 4i + 3 of A_jp · x[t], for the adapter
// in `slot` and group part p.
fn lora_ax4(slot: u32, p: u32, i: u32, t: u32, li: u32) -> vec4<f32> {
    let a = LORA_A_AT + ((slot * LORA_GP + p) * LORA_RANK + 4u * i) * LORA_K4;
    var sum = vec4<f32>();
    for (var k = li; k < LORA_K4; k += LANES) {
        let xk = x[t * LORA_K4 + k];
        sum += vec4<f32>(dot(lora_side[a + k], xk), dot(lora_side[a + LORA_K4 + k], xk),
                         dot(lora_side[a + 2u * LORA_K4 + k], xk), dot(lora_side[a + 3u * LORA_K4 + k], xk));
    }
    return sum;
}
