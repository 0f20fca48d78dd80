// Attention's reductions over 32 lanes through workgroup memory, for adapters without 32-lane
// subgroups: each 32 lanes (li / 32) use their own slice, and every lane folds its slice in lane
// order, so all lanes get bit-identical results. Called by every lane of the workgroup alike.

var<workgroup> lane_values: array<f32, WG>;

/// The largest `v` of the caller's 32 lanes.
fn lanes_max(v: f32, li: u32) -> f32 {
    lane_values[li] = v;
    workgroupBarrier();
    let base = li & ~31u;
    var m = lane_values[base];
    for (var i = 1u; i < 32u; i++) {
        m = max(m, lane_values[base + i]);
    }
    workgroupBarrier();
    return m;
}

/// The sum of the caller's 32 lanes' `v`.
fn lanes_sum(v: f32, li: u32) -> f32 {
    lane_values[li] = v;
    workgroupBarrier();
    let base = li & ~31u;
    var sum = 0.0;
    for (var i = 0u; i < 32u; i++) {
        sum += lane_values[base + i];
    }
    workgroupBarrier();
    return sum;
}
