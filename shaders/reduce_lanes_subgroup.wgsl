// Sums over teams of LANES consecutive invocations (LANES a power of two dividing WG), with
// subgroup shuffles. Needs consts LANES and WG. The entry point takes a `Lane` parameter.

struct Lane {
    @builtin(local_invocation_index) index: u32,
    @builtin(subgroup_size) sg_size: u32,
}

// Only used where subgroups are narrower than a team (e.g. 8-wide on lavapipe, Intel SIMD8).
// Two slots: a second sum (slot 1) must not overwrite values the first (slot 0) is still reading.
var<workgroup> team_partials: array<vec4<f32>, 2 * WG>;

// The sum of v over the caller's team, returned to every member. Call from uniform control flow.
fn lanes_sum(lane: Lane, v: vec4<f32>, slot: u32) -> vec4<f32> {
    // Subgroups tile a 1-D workgroup in invocation-index order, so a team is whole subgroups or
    // lies in one; XOR offsets below LANES stay in the team, those past the subgroup are skipped.
    var s = v;
    for (var o = 1u; o < LANES; o <<= 1u) {
        let other = subgroupShuffleXor(s, o);  // called by all: Tint sees sg_size as non-uniform
        if o < lane.sg_size {
            s += other;
        }
    }
    if LANES <= 4u {  // subgroups have at least 4 invocations
        return s;
    }
    let narrow = LANES > lane.sg_size;
    if narrow {
        team_partials[slot * WG + lane.index] = s;
    }
    workgroupBarrier();
    if narrow {
        let first = lane.index & ~(LANES - 1u);
        s = vec4<f32>();
        for (var i = 0u; i < LANES; i += lane.sg_size) {
            s += team_partials[slot * WG + first + i];
        }
    }
    return s;
}
