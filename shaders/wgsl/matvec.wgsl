// y[t, off + n] (+)= sum_k x[t, k] * W[n, k] for the few tokens of a decode step: the fast path
// for TOKENS or fewer tokens, where a matmul is one pass over the weights.
//
// A group of 32 lanes walks ROWS rows at once over blocks of 32 columns, 8 blocks at a time:
// lane i takes quarter i % 4 of block i / 4 (the format's `quarter_cols`/`quarter_dot`), so the
// warp's weight loads are contiguous and each activation run is loaded once for all ROWS rows.
// KSPLIT lane groups of a workgroup share one set of rows, each taking every KSPLIT-th run of 8
// blocks, so a long row takes fewer trips per lane (the engine splits rows of 8192 columns or
// more, `MatvecShape::for_matrix`). The ROWS x TOKENS sums
// stay in registers (every loop bound is a pipeline constant, so the driver unrolls them) and are
// combined across the lanes by `sum_row_lanes` (subgroupAdd where subgroups are exactly 32
// lanes, workgroup memory elsewhere), then across the KSPLIT groups in workgroup memory. Rows
// must be a whole number of blocks long. Unlike matmul.wgsl this is not batch-invariant: a
// token's sums depend on TOKENS, which the engine picks from the step's token count.
// Deterministic mode never uses it.

// Tokens per weight load and rows per lane group; ROWS * TOKENS <= MAX_TILE.
override TOKENS: u32 = 1u;
override ROWS: u32 = 1u;
// Groups of 8 blocks each lane loads before computing (see the loop).
override UNROLL: u32 = 4u;
// KSPLIT, SPLIT, WG and the sums across lanes and groups: matvec_groups.wgsl.

@compute @workgroup_size(WG)
fn main(@builtin(local_invocation_index) li: u32, @builtin(workgroup_id) wg: vec3<u32>) {
    let lane = li % SPLIT;
    let group = li / SPLIT;
    let kpart = group % KSPLIT;
    let row0 = (wg.x * (WG / SPLIT / KSPLIT) + group / KSPLIT) * ROWS;
    let n_tok = step_rows();
    let t0 = wg.y * TOKENS;
    // Tokens past the step's count read the buffer's stale rows (always allocated) and are never
    // written, so the loops keep constant bounds.
    let last_row = p.n - 1u;

    var acc: array<f32, MAX_TILE>;
    let quarter = lane % 4u;
    let cols = quarter_cols(quarter);
    let nb = p.k / BLOCK;
    // UNROLL runs of 8 blocks per trip, every load of a trip issued before its arithmetic: a
    // warp then has UNROLL x ROWS x 128 bytes of weights in flight instead of 128, which is what
    // bandwidth needs (Little's law). Blocks past the row read the last block and count 0.
    let run = KSPLIT * SPLIT / 4u;
    for (var b0 = kpart * (SPLIT / 4u) + lane / 4u; b0 < nb; b0 += UNROLL * run) {
        for (var u = 0u; u < UNROLL; u++) {
            let b = b0 + u * run;
            let bb = min(b, nb - 1u);
            for (var t = 0u; t < TOKENS; t++) {
                let xo = (t0 + t) * p.x_stride + bb * BLOCK;
                let xa = x4(xo + cols.x);
                let xb = x4(xo + cols.y);
                for (var r = 0u; r < ROWS; r++) {
                    let row = min(row0 + r, last_row);
                    acc[r * TOKENS + t] += select(0.0, quarter_dot(row, bb, p.k, quarter, xa, xb), b < nb);
                }
            }
        }
    }

    sum_row_groups(&acc, li, ROWS * TOKENS);

    if (lane == 0u && kpart == 0u) {
        for (var r = 0u; r < ROWS; r++) {
            for (var t = 0u; t < TOKENS; t++) {
                if (row0 + r < p.n && t0 + t < n_tok) {
                    store_y(t0 + t, row0 + r, acc[r * TOKENS + t]);
                }
            }
        }
    }
}
