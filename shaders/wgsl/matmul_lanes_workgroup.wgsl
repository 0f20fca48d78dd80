// Sums acc[0..nt] over the SPLIT lanes of each row through workgroup memory, by a fixed tree;
// lane 0 of the row ends with the totals. For adapters without 32-lane subgroups.

// Sized for WG x MAX_TILE <= 4,096: matmul.wgsl's 64 lanes of 8 sums, the matvecs' up to 256
// lanes of 16 (`MatvecShape::MAX_LANES`).
var<workgroup> partial: array<f32, 4096>;

fn sum_row_lanes(acc: ptr<function, array<f32, MAX_TILE>>, li: u32, lane: u32, nt: u32) {
    for (var tt = 0u; tt < nt; tt++) {
        partial[li * MAX_TILE + tt] = (*acc)[tt];
    }
    workgroupBarrier();
    for (var stride = SPLIT / 2u; stride > 0u; stride >>= 1u) {
        if (lane < stride) {
            for (var tt = 0u; tt < nt; tt++) {
                partial[li * MAX_TILE + tt] += partial[(li + stride) * MAX_TILE + tt];
            }
        }
        workgroupBarrier();
    }
    for (var tt = 0u; tt < nt; tt++) {
        (*acc)[tt] = partial[li * MAX_TILE + tt];
    }
}
