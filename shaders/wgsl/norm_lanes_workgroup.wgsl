// rmsnorm's sum over its WG lanes through workgroup memory, for adapters without 32-lane
// subgroups: a fixed tree, log2(WG) barriers.

var<workgroup> red: array<f32, WG>;

// The sum of every lane's `v`, by a fixed tree.
fn sum_lanes(lane: u32, v: f32) -> f32 {
    red[lane] = v;
    workgroupBarrier();
    for (var stride = WG / 2u; stride > 0u; stride >>= 1u) {
        if (lane < stride) {
            red[lane] += red[lane + stride];
        }
        workgroupBarrier();
    }
    return workgroupUniformLoad(&red[0]);
}
