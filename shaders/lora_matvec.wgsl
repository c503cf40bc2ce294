// The mat-vec's LoRA hook (matvec.wgsl calls it; lora_off.wgsl is it without LoRA): each lane adds
// its share of its team's rows' B · u (lora.wgsl; u = A · x was computed once for the step by the
// input group's A·x kernel) to its sums before the lanes' sums are added up, so the GLU, the norm
// tail and a joined weight's second region all see y with its side paths. `lo` and `hi` are the
// weight rows summed in acc.lo and acc.hi.

fn lora_add(acc: ptr<function, Sums>, t: u32, lo: vec4<u32>, hi: vec4<u32>, lane: u32) {
    if !lora_any(t) {
        return;
    }
    (*acc).lo.x += lora_row(t, lo.x, lane, LANES);
    if LO > 1u {
        (*acc).lo.y += lora_row(t, lo.y, lane, LANES);
    }
    if LO > 2u {
        (*acc).lo.z += lora_row(t, lo.z, lane, LANES);
    }
    if LO > 3u {
        (*acc).lo.w += lora_row(t, lo.w, lane, LANES);
    }
    if HI > 0u {
        (*acc).hi.x += lora_row(t, hi.x, lane, LANES);
    }
    if HI > 1u {
        (*acc).hi.y += lora_row(t, hi.y, lane, LANES);
    }
    if HI > 2u {
        (*acc).hi.z += lora_row(t, hi.z, lane, LANES);
    }
    if HI > 3u {
        (*acc).hi.w += lora_row(t, hi.w, lane, LANES);
    }
}
