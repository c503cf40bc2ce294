// The mat-vec's LoRA hooks (matvec.wgsl calls them; lora_off.wgsl is them without LoRA). First
// `lora_begin` computes the workgroup's token's u = s_j * A_j · x for this weight's parts into
// workgroup memory (lora_ax.wgsl; a mat-vec step needs no A·x kernel of its own), then `lora_add`
// has each lane add its share of its team's rows' B · u (lora.wgsl) to its sums before the lanes'
// sums are added up, so the GLU, the norm tail and a joined weight's second region all see y with
// its side paths. `lo` and `hi` are the weight rows summed in acc.lo and acc.hi.

const LORA_Q4: u32 = LORA_P * LORA_R4;  // vec4s of u per adapter column
var<workgroup> lora_wu: array<vec4<f32>, 4u * LORA_Q4>;  // [column j][part][rank / 4]
// [column j][part]: rank / 4, read once here rather than by every row's B·u
var<workgroup> lora_wr: array<u32, 4u * LORA_P>;

fn lora_u(t: u32, j: u32, p: u32, i: u32) -> vec4<f32> {
    return lora_wu[j * LORA_Q4 + (p - LORA_PART0) * LORA_R4 + i];
}

fn lora_r4(j: u32, slot: i32, p: u32) -> u32 {
    return lora_wr[j * LORA_P + p - LORA_PART0];
}

// u of token t's adapters for this weight's parts, 4 rows a team. Call from uniform control flow
// (t is the workgroup's); every branch below is uniform too, as lanes_sum needs.
fn lora_begin(t: u32, lane: Lane) {
    if !lora_any(t) {
        return;
    }
    if lane.index < 4u * LORA_P {
        let slot = lora_tokens[t].slots[lane.index / LORA_P];
        lora_wr[lane.index] = lora_rows(slot, LORA_PART0 + lane.index % LORA_P) / 4u;
    }
    let team = lane.index / LANES;
    let li = lane.index % LANES;
    var round = 0u;
    for (var j = 0u; j < 4u; j++) {
        let slot = lora_tokens[t].slots[j];
        if slot < 0 {
            continue;
        }
        for (var q0 = 0u; q0 < LORA_Q4; q0 += WG / LANES) {
            let q = q0 + team;
            let quad = lora_quad(slot, q, LORA_PART0, LORA_P);
            var sum = vec4<f32>();
            if quad.working {
                sum = lora_ax4(u32(slot), quad.p, quad.i, t, li);
            }
            // slots alternate: the previous round's first lanes may still be reading theirs
            let total = lanes_sum(lane, sum, round % 2u);
            round++;
            if quad.working && li == 0u {
                lora_wu[j * LORA_Q4 + q] = total * lora_tokens[t].scales[j];
            }
        }
    }
    workgroupBarrier();
}

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
