// Sums over teams of LANES consecutive invocations (LANES a power of two dividing WG), through
// workgroup memory (no subgroup support). Needs consts LANES and WG. The entry point takes a
// `Lane` parameter.

struct Lane {
    @builtin(local_invocation_index) index: u32,
}

// Two slots: a second sum (slot 1) must not overwrite values the first (slot 0) is still reading.
var<workgroup> team_partials: array<vec4<f32>, 2 * WG>;

// The sum of v over the caller's team, returned to its first member (the one that writes it).
// Call from uniform control flow. One barrier: each team's first member adds its LANES values.
fn lanes_sum(lane: Lane, v: vec4<f32>, slot: u32) -> vec4<f32> {
    if LANES == 1u {
        return v;
    }
    team_partials[slot * WG + lane.index] = v;
    workgroupBarrier();
    var total = vec4<f32>();
    if lane.index % LANES == 0u {
        for (var i = 0u; i < LANES; i++) {
            total += team_partials[slot * WG + lane.index + i];
        }
    }
    return total;
}
