// Attention's reductions over 32 lanes through subgroup operations: chosen only where every
// subgroup is exactly 32 lanes, so each 32 lanes of the workgroup are one subgroup and need no
// barriers.

/// The largest `v` of the caller's 32 lanes.
fn lanes_max(v: f32, li: u32) -> f32 {
    return subgroupMax(v);
}

/// The sum of the caller's 32 lanes' `v`.
fn lanes_sum(v: f32, li: u32) -> f32 {
    return subgroupAdd(v);
}
