// Workgroup sum with subgroupAdd, then one slot per subgroup in workgroup memory. Needs consts WG
// and R (values summed per thread). The entry point takes a `Lane` parameter.

struct Lane {
    @builtin(local_invocation_index) index: u32,
    @builtin(subgroup_invocation_id) sg_lane: u32,
    @builtin(subgroup_size) sg_size: u32,
}

// WebGPU's smallest subgroup size bounds the number of subgroups in a workgroup.
const SLOTS: u32 = (WG + 3u) / 4u;

var<workgroup> partials: array<f32, R * SLOTS>;

// Sums each of the R values over the workgroup; thread i < R returns sum number i.
// Call from uniform control flow.
fn workgroup_sum(lane: Lane, v: array<f32, R>) -> f32 {
    // Subgroups tile a 1-D workgroup in invocation-index order.
    let sg = lane.index / lane.sg_size;
    for (var r = 0u; r < R; r++) {
        let s = subgroupAdd(v[r]);
        if lane.sg_lane == 0u {
            partials[r * SLOTS + sg] = s;
        }
    }
    workgroupBarrier();
    let r = min(lane.index, R - 1u);
    var total = 0.0;
    for (var i = 0u; i < (WG + lane.sg_size - 1u) / lane.sg_size; i++) {
        total += partials[r * SLOTS + i];
    }
    return total;
}
