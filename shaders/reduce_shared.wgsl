// Workgroup sum through workgroup memory (no subgroup support). Needs consts WG (a power of two)
// and R (values summed per thread). The entry point takes a `Lane` parameter.

struct Lane {
    @builtin(local_invocation_index) index: u32,
}

var<workgroup> partials: array<f32, R * WG>;

// Sums each of the R values over the workgroup; thread i < R returns sum number i.
// Call from uniform control flow.
fn workgroup_sum(lane: Lane, v: array<f32, R>) -> f32 {
    for (var r = 0u; r < R; r++) {
        partials[r * WG + lane.index] = v[r];
    }
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        workgroupBarrier();
        if lane.index < s {
            for (var r = 0u; r < R; r++) {
                partials[r * WG + lane.index] += partials[r * WG + lane.index + s];
            }
        }
    }
    workgroupBarrier();
    return partials[min(lane.index, R - 1u) * WG];
}
