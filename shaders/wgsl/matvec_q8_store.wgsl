// matvec_q8.wgsl's sums leave through store_y (matmul_io.wgsl): lane 0 of each set of rows'
// first lane group holds them.

// Rows set * ROWS.. of the set.
fn weight_row(rows_set: u32, r: u32) -> u32 {
    return rows_set * ROWS + r;
}

fn finish_rows(acc: ptr<function, array<f32, MAX_TILE>>, li: u32, rows_set: u32, t0: u32, n_tok: u32) {
    let row0 = rows_set * ROWS;
    if (li % (SPLIT * KSPLIT) != 0u) {
        return;
    }
    for (var r = 0u; r < ROWS; r++) {
        for (var t = 0u; t < TOKENS; t++) {
            if (row0 + r < p.n && t0 + t < n_tok) {
                store_y(t0 + t, row0 + r, (*acc)[r * TOKENS + t]);
            }
        }
    }
}
