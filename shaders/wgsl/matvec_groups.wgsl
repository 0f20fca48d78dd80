// What the two decode matvecs (matvec.wgsl, matvec_q8.wgsl) share: a workgroup of WG lanes is
// WG / SPLIT lane groups, and KSPLIT consecutive groups split one set of rows' blocks between
// them, so a long row takes fewer trips per lane.

// Lane groups that split one set of rows' blocks between them; divides WG / SPLIT.
override KSPLIT: u32 = 1u;
override SPLIT: u32 = 32u;
override WG: u32 = 64u;

// Sums a lane keeps (ROWS x TOKENS); matmul_lanes_workgroup.wgsl sizes its buffer by it.
const MAX_TILE: u32 = 16u;
const MAX_GROUPS: u32 = 8u;

var<workgroup> group_sums: array<f32, MAX_GROUPS * MAX_TILE>;

// Sums acc[0..nt] over the SPLIT lanes of each group (`sum_row_lanes`), then over the KSPLIT
// groups of a row in group order through workgroup memory: lane 0 of the row's first group
// (kpart 0) ends with the totals.
fn sum_row_groups(acc: ptr<function, array<f32, MAX_TILE>>, li: u32, nt: u32) {
    let lane = li % SPLIT;
    let group = li / SPLIT;
    sum_row_lanes(acc, li, lane, nt);
    if (KSPLIT == 1u) {
        return;
    }
    if (lane == 0u) {
        for (var tt = 0u; tt < nt; tt++) {
            group_sums[group * MAX_TILE + tt] = (*acc)[tt];
        }
    }
    workgroupBarrier();
    if (lane == 0u && group % KSPLIT == 0u) {
        for (var tt = 0u; tt < nt; tt++) {
            var total = 0.0;
            for (var g = 0u; g < KSPLIT; g++) {
                total += group_sums[(group + g) * MAX_TILE + tt];
            }
            (*acc)[tt] = total;
        }
    }
}
