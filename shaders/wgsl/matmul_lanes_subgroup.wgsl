// Sums acc[0..nt] over the SPLIT = 32 lanes of each row with subgroupAdd: chosen only where
// every subgroup is exactly 32 lanes, so a row's lanes are one subgroup. No workgroup memory
// and no barriers.

fn sum_row_lanes(acc: ptr<function, array<f32, MAX_TILE>>, li: u32, lane: u32, nt: u32) {
    for (var tt = 0u; tt < nt; tt++) {
        (*acc)[tt] = subgroupAdd((*acc)[tt]);
    }
}
