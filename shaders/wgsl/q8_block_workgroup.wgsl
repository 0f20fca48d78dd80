// q8_lanes.wgsl's block reductions through workgroup memory, for adapters without 32-lane
// subgroups: the 8 lanes of a block (8k..8k+7) each fold the block's values in lane order.

var<workgroup> q8_amax: array<f32, Q8_LANES>;
var<workgroup> q8_qsum: array<i32, Q8_LANES>;

/// The largest `v` of the caller's block of 8 lanes.
fn block_max(li: u32, v: f32) -> f32 {
    q8_amax[li] = v;
    workgroupBarrier();
    let first = li & ~7u;
    var m = 0.0;
    for (var i = 0u; i < 8u; i++) {
        m = max(m, q8_amax[first + i]);
    }
    return m;
}

/// The sum of the caller's block's `v`.
fn block_sum(li: u32, v: i32) -> i32 {
    q8_qsum[li] = v;
    // Also orders this call's reads of q8_amax before the next call's writes.
    workgroupBarrier();
    let first = li & ~7u;
    var sum = 0i;
    for (var i = 0u; i < 8u; i++) {
        sum += q8_qsum[first + i];
    }
    return sum;
}
