// q8_lanes.wgsl's block reductions where every subgroup is exactly 32 lanes, so a block's 8
// lanes (8k..8k+7) are in one subgroup: three butterfly shuffles each, no workgroup memory and
// no barrier.

/// The largest `v` of the caller's block of 8 lanes (values are magnitudes, at least 0).
fn block_max(li: u32, v: f32) -> f32 {
    var m = v;
    m = max(m, subgroupShuffleXor(m, 1u));
    m = max(m, subgroupShuffleXor(m, 2u));
    m = max(m, subgroupShuffleXor(m, 4u));
    return m;
}

/// The sum of the caller's block's `v`.
fn block_sum(li: u32, v: i32) -> i32 {
    var s = v;
    s += subgroupShuffleXor(s, 1u);
    s += subgroupShuffleXor(s, 2u);
    s += subgroupShuffleXor(s, 4u);
    return s;
}
