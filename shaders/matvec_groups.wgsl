// The mat-vec's walk along K for any type with a dequant8 snippet (blocks.wgsl + dequant_<type>.wgsl),
// composed with matvec.wgsl. Each iteration a team takes 2 * LANES groups of 8 elements, two per
// lane: neighbouring groups where a block has several (their dequants share the block's scale
// loads), else groups LANES apart (neighbouring lanes then read neighbouring bytes). Each x load
// serves all the team's rows.

const GROUPS: u32 = K / 8u;
const GROUPS_PER_BLOCK: u32 = QK / 8u;
const SPLIT: u32 = select(LANES, 1u, GROUPS_PER_BLOCK > 1u);  // a lane's second group, after its first
const CHUNK: u32 = 2u * LANES;  // groups a team takes per iteration
const WHOLE: u32 = GROUPS / CHUNK * CHUNK;  // groups in whole chunks

// Elements 8gi .. 8gi+7 of x[t].
fn x8(t: u32, gi: u32) -> Dq8 {
    let i = 2u * (t * GROUPS + gi);
    return Dq8(vec4<F>(x[i]), vec4<F>(x[i + 1u]));
}

fn group_dot(row: u32, gi: u32, xg: Dq8) -> f32 {
    let q = dequant8(row + gi / GROUPS_PER_BLOCK * BLOCK_BYTES, gi % GROUPS_PER_BLOCK);
    return f32(dot(q.lo, xg.lo) + dot(q.hi, xg.hi));
}

// Group gi of the first `count` rows of `rows` (a constant after inlining; the rest stay 0).
fn rows_dot(rows: vec4<u32>, count: u32, gi: u32, xg: Dq8) -> vec4<f32> {
    var s = vec4<f32>(group_dot(rows.x, gi, xg), 0.0, 0.0, 0.0);
    if count > 1u {
        s.y = group_dot(rows.y, gi, xg);
    }
    if count > 2u {
        s.z = group_dot(rows.z, gi, xg);
    }
    if count > 3u {
        s.w = group_dot(rows.w, gi, xg);
    }
    return s;
}

fn add_group(acc: ptr<function, Sums>, rows: Rows, t: u32, gi: u32) {
    let xg = x8(t, gi);
    (*acc).lo += rows_dot(rows.lo, LO, gi, xg);
    if HI > 0u {
        (*acc).hi += rows_dot(rows.hi, HI, gi, xg);
    }
}

// The partial sums of invocation `lid` over its team's rows (byte offsets in `rows`) for token t.
fn walk(rows: Rows, t: u32, lid: u32) -> Sums {
    var acc = Sums(vec4<f32>(), vec4<f32>());
    let li = lid % LANES;
    let g = select(li, 2u * li, SPLIT == 1u);  // the lane's first group in a chunk
    for (var c = 0u; c < WHOLE; c += CHUNK) {
        add_group(&acc, rows, t, c + g);
        add_group(&acc, rows, t, c + g + SPLIT);
    }
    if WHOLE + g < GROUPS {
        add_group(&acc, rows, t, WHOLE + g);
    }
    if WHOLE + g + SPLIT < GROUPS {
        add_group(&acc, rows, t, WHOLE + g + SPLIT);
    }
    return acc;
}
