// y[t, off + n] (+)= sum_k x[t, k] * W[n, k] for every token t of the step and row n of W.
//
// Batch invariance: every output is a sum over k in one fixed order (blocks of 32, each block's
// dot product by the same code; blocks split over SPLIT lanes; lanes combined by a fixed tree), so
// a token's result does not depend on how many tokens share the step or which tile it lands in.
// One pipeline serves every token count (a second tile size could contract multiply-adds
// differently), and TILE_T tokens share each weight load.
//
// SPLIT = 1 suits CPU drivers (no barriers, one row per invocation); SPLIT = 32 suits GPUs
// (a warp walks one row with coalesced loads). The lanes of a row are summed by
// `sum_row_lanes`, from matmul_lanes_subgroup.wgsl where subgroups are exactly 32 lanes wide and
// from matmul_lanes_workgroup.wgsl elsewhere.

override SPLIT: u32 = 1u;
override TILE_T: u32 = 8u;

const WG: u32 = 64u;
const MAX_TILE: u32 = 8u;

@compute @workgroup_size(WG)
fn main(@builtin(local_invocation_index) li: u32, @builtin(workgroup_id) wg: vec3<u32>) {
    let lane = li % SPLIT;
    let row = wg.x * (WG / SPLIT) + li / SPLIT;
    let n_tok = step_rows();
    let t0 = wg.y * TILE_T;
    let nt = min(TILE_T, n_tok - min(t0, n_tok));

    var acc: array<f32, MAX_TILE>;
    if (row < p.n) {
        let nb = (p.k + BLOCK - 1u) / BLOCK;
        for (var b = lane; b < nb; b += SPLIT) {
            for (var tt = 0u; tt < nt; tt++) {
                acc[tt] += block_dot(row, b, p.k, (t0 + tt) * p.x_stride + b * BLOCK);
            }
        }
    }

    if (SPLIT > 1u) {
        sum_row_lanes(&acc, li, lane, nt);
    }

    if (row < p.n && lane == 0u) {
        for (var tt = 0u; tt < nt; tt++) {
            store_y(t0 + tt, row, acc[tt]);
        }
    }
}
