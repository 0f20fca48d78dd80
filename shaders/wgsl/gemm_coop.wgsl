// y[t, off + n] (+)= sum_k x[t, k] * W[n, k] on the adapter's matrix units (cooperative-matrix
// multiply-adds, 16 x 16 x 16, f16 inputs, f32 sums), for adapters whose subgroups are 32 lanes
// and that offer that configuration. Rows must be a whole number of 32-column blocks long.
//
// A workgroup of TILE_R / 16 subgroups owns TILE_R weight rows by 128 tokens; subgroup s owns
// rows 32 (s % (TILE_R / 32)).. + 31 against tokens 64 (s / (TILE_R / 32)).. + 63, in eight
// accumulators, so each pair of fragment loads feeds two multiply-adds or more. A step takes BK
// columns: the loader dequantizes the weight tile once into workgroup memory as f16, a quarter
// block per call of the format's `quarter_weights` (one word and one scale for 8 weights), and
// converts the activations beside it. Tiles hold f16 four to an element, so a lane stores a run
// of 4 values at once (16 scalar f16 stores a block made the loader, not the matrix units, the
// bound). The next step's weights and activations are loaded into registers while this step's
// multiply-adds run. The sums leave through a per-subgroup staging tile, so tile edges and
// accumulation are plain bounded writes.
//
// Split reductions: a workgroup walks all the columns in sequence, a step's loads, barriers and
// multiply-adds each waiting on the last, so a matrix with few tiles (few rows, or few tokens)
// runs at the latency of one tile's walk whatever the GPU's size. With SPLIT_K > 1 the grid's z
// splits the column steps, each workgroup leaves its sums in `parts`, and a second dispatch of
// this kernel with SUM_PASS adds the splits' sums in split order (so a result does not depend on
// which finished first) and stores them. Not batch-invariant, and its f16 inputs round (about
// 1e-3 relative to the sum of |w x|) and overflow beyond 65504.


// Weight rows and tokens of a workgroup's tile (128 or 256 rows). 256 rows halve the activations
// each lane loads a step, for matrices with enough rows to fill the GPU (`gemm_coop_rows` in
// core).
override TILE_R: u32 = 128u;
const TILE_T: u32 = 128u;
const BK: u32 = 32u;
// Blocks of 32 columns a step.
const NB: u32 = BK / 32u;
// Row stride of the tiles in f16: BK padded by 8, so fragment loads of consecutive rows fall on
// different banks.
const LD: u32 = BK + 8u;
override WG: u32 = 2u * TILE_R;
// Lanes that share a token's activations in the loader, and the runs of 4 each loads a block (at
// most MAX_X_RUNS).
override X_LANES: u32 = WG / TILE_T;
// Splits of the column steps (the grid's z), and whether this dispatch is the pass that adds them.
override SPLIT_K: u32 = 1u;
override SUM_PASS: bool = false;

// Split z's sums of token t, row n at (z * tokens + t) * rows + n.
@group(0) @binding(7) var<storage, read_write> parts: array<f32>;
override X_RUNS: u32 = 8u / X_LANES;
const MAX_X_RUNS: u32 = 4u;

// The tiles' element: PER halves, so a run of 4 is 4 / PER stores. (Fragments load from vectors
// of f16 on NVIDIA; vectors of u32 failed its compiler.)
alias Elem = vec4<f16>;
const PER: u32 = 4u;
const LDV: u32 = LD / PER;

// [row][column] of the weight tile and [token][column] of the activations.
var<workgroup> w_tile: array<Elem, TILE_R * LDV>;
var<workgroup> x_tile: array<Elem, TILE_T * LDV>;
// One 16 x 16 result per subgroup on its way out, [token][row].
var<workgroup> stage: array<f32, WG / 32u * 256u>;

/// Stores a run of 4 halves at half index i (a multiple of 4) of the weight or activation tile.
fn put_w(i: u32, v: vec4<f16>) {
    w_tile[i / 4u] = v;
}

fn put_x(i: u32, v: vec4<f16>) {
    x_tile[i / 4u] = v;
}

/// Writes the subgroup's staged 16 x 16 results for rows r.. and tokens t.. (bounded), as
/// split z's share where the columns are split, then waits so the stage can be reused. Called by
/// every lane.
fn flush(sg: u32, lane: u32, r: u32, t: u32, n_tok: u32, z: u32) {
    workgroupBarrier();
    for (var e = lane; e < 256u; e += 32u) {
        let row = r + e % 16u;
        let tok = t + e / 16u;
        if (row < p.n && tok < n_tok) {
            let v = stage[sg * 256u + e];
            if (SPLIT_K > 1u) {
                parts[(z * n_tok + tok) * p.n + row] = v;
            } else {
                store_y(tok, row, v);
            }
        }
    }
    workgroupBarrier();
}

/// The sum pass: workgroup (x, y) adds the splits' sums of token y for WG rows from x * WG.
fn sum_splits(li: u32, wg: vec3<u32>, n_tok: u32) {
    let row = wg.x * WG + li;
    let tok = wg.y;
    if (row >= p.n || tok >= n_tok) {
        return;
    }
    var total = 0.0;
    for (var z = 0u; z < SPLIT_K; z++) {
        total += parts[(z * n_tok + tok) * p.n + row];
    }
    store_y(tok, row, total);
}

/// Step s's share of one lane into registers, as f16 runs of 4: for each of the step's blocks,
/// two quarters of weight row `w_row` (the format's `quarter_cols`), and 16 activations of token
/// `x_tok` from column half * 16. Blocks past the row's end load zeros.
fn load_step(s: u32, nb: u32, w_row: u32, x_tok: u32, half: u32, xq: u32, w_runs: ptr<function, array<vec4<f16>, 4u * NB>>, x_runs: ptr<function, array<vec4<f16>, MAX_X_RUNS * NB>>) {
    for (var bb = 0u; bb < NB; bb++) {
        let b = s * NB + bb;
        if (b < nb) {
            for (var qq = 0u; qq < 2u; qq++) {
                let m = quarter_weights(w_row, b, p.k, half * 2u + qq);
                (*w_runs)[bb * 4u + qq * 2u] = vec4<f16>(m[0]);
                (*w_runs)[bb * 4u + qq * 2u + 1u] = vec4<f16>(m[1]);
            }
            let xo = x_tok * p.x_stride + b * 32u + xq * 4u * X_RUNS;
            for (var j = 0u; j < X_RUNS; j++) {
                (*x_runs)[bb * X_RUNS + j] = vec4<f16>(x4(xo + 4u * j));
            }
        } else {
            for (var j = 0u; j < 4u; j++) {
                (*w_runs)[bb * 4u + j] = vec4<f16>();
            }
            for (var j = 0u; j < X_RUNS; j++) {
                (*x_runs)[bb * X_RUNS + j] = vec4<f16>();
            }
        }
    }
}

@compute @workgroup_size(WG)
fn main(@builtin(local_invocation_index) li: u32, @builtin(workgroup_id) wg: vec3<u32>) {
    let n_tok = step_rows();
    if (SUM_PASS) {
        sum_splits(li, wg, n_tok);
        return;
    }
    let r0 = wg.x * TILE_R;
    let t0 = wg.y * TILE_T;
    let sg = li / 32u;
    let lane = li % 32u;
    let sr = (sg % (TILE_R / 32u)) * 32u;
    let st = (sg / (TILE_R / 32u)) * 64u;
    // The loader's share of each block: half a block (two quarters) of one weight row, and
    // 4 X_RUNS columns of one token's activations.
    let ld = li / 2u;
    let half = li % 2u;
    let xt = li / X_LANES;
    let xq = li % X_LANES;
    let w_row = min(r0 + ld, p.n - 1u);
    let x_tok = min(t0 + xt, max(n_tok, 1u) - 1u);
    let nb = p.k / 32u;
    // This split's column steps.
    // (Unsplit, the bounds are constants to the compiler, as before splits existed.)
    let all = (nb + NB - 1u) / NB;
    let per = (all + SPLIT_K - 1u) / SPLIT_K;
    let first = select(wg.z * per, 0u, SPLIT_K == 1u);
    let steps = select(min(all, first + per), all, SPLIT_K == 1u);

    // A step's share in registers (`load_step`), and the tile columns of its weight runs.
    var w_runs: array<vec4<f16>, 4u * NB>;
    var w_cols: array<u32, 4u * NB>;
    var x_runs: array<vec4<f16>, MAX_X_RUNS * NB>;
    for (var bb = 0u; bb < NB; bb++) {
        for (var qq = 0u; qq < 2u; qq++) {
            let cols = quarter_cols(half * 2u + qq) + vec2<u32>(bb * 32u);
            w_cols[bb * 4u + qq * 2u] = cols.x;
            w_cols[bb * 4u + qq * 2u + 1u] = cols.y;
        }
    }

    var c00 = coop_mat16x16<f32, C>();
    var c01 = coop_mat16x16<f32, C>();
    var c02 = coop_mat16x16<f32, C>();
    var c03 = coop_mat16x16<f32, C>();
    var c10 = coop_mat16x16<f32, C>();
    var c11 = coop_mat16x16<f32, C>();
    var c12 = coop_mat16x16<f32, C>();
    var c13 = coop_mat16x16<f32, C>();
    load_step(first, nb, w_row, x_tok, half, xq, &w_runs, &x_runs);
    for (var s = first; s < steps; s++) {
        for (var i = 0u; i < 4u * NB; i++) {
            put_w(ld * LD + w_cols[i], w_runs[i]);
        }
        for (var i = 0u; i < X_RUNS * NB; i++) {
            put_x(xt * LD + (i / X_RUNS) * 32u + xq * 4u * X_RUNS + (i % X_RUNS) * 4u, x_runs[i]);
        }
        workgroupBarrier();
        // The next step into registers while this one's multiply-adds run. (No branch around the
        // multiply-adds: naga counts any loop variable as non-uniform.)
        if (s + 1u < steps) {
            load_step(s + 1u, nb, w_row, x_tok, half, xq, &w_runs, &x_runs);
        }
        for (var kk = 0u; kk < BK; kk += 16u) {
            let a0 = coopLoadT<coop_mat16x16<f16, A>>(&w_tile[(sr * LD + kk) / PER], LDV);
            let a1 = coopLoadT<coop_mat16x16<f16, A>>(&w_tile[((sr + 16u) * LD + kk) / PER], LDV);
            // B[k][t] = x_tile[t][k]: the activations read column-major.
            let b0 = coopLoad<coop_mat16x16<f16, B>>(&x_tile[(st * LD + kk) / PER], LDV);
            let b1 = coopLoad<coop_mat16x16<f16, B>>(&x_tile[((st + 16u) * LD + kk) / PER], LDV);
            let b2 = coopLoad<coop_mat16x16<f16, B>>(&x_tile[((st + 32u) * LD + kk) / PER], LDV);
            let b3 = coopLoad<coop_mat16x16<f16, B>>(&x_tile[((st + 48u) * LD + kk) / PER], LDV);
            c00 = coopMultiplyAdd(a0, b0, c00);
            c01 = coopMultiplyAdd(a0, b1, c01);
            c02 = coopMultiplyAdd(a0, b2, c02);
            c03 = coopMultiplyAdd(a0, b3, c03);
            c10 = coopMultiplyAdd(a1, b0, c10);
            c11 = coopMultiplyAdd(a1, b1, c11);
            c12 = coopMultiplyAdd(a1, b2, c12);
            c13 = coopMultiplyAdd(a1, b3, c13);
        }
        workgroupBarrier();
    }

    // C[row][token] into stage[token][row] (column-major). naga 30's SPIR-V writer needs every
    // non-literal argument of coopStore bound to a name first.
    let so = sg * 256u;
    let ss = 16u;
    let ra = r0 + sr;
    let rb = ra + 16u;
    let ta = t0 + st;
    let tb = ta + 16u;
    let tc = ta + 32u;
    let td = ta + 48u;
    coopStore(c00, &stage[so], ss);
    flush(sg, lane, ra, ta, n_tok, wg.z);
    coopStore(c01, &stage[so], ss);
    flush(sg, lane, ra, tb, n_tok, wg.z);
    coopStore(c02, &stage[so], ss);
    flush(sg, lane, ra, tc, n_tok, wg.z);
    coopStore(c03, &stage[so], ss);
    flush(sg, lane, ra, td, n_tok, wg.z);
    coopStore(c10, &stage[so], ss);
    flush(sg, lane, rb, ta, n_tok, wg.z);
    coopStore(c11, &stage[so], ss);
    flush(sg, lane, rb, tb, n_tok, wg.z);
    coopStore(c12, &stage[so], ss);
    flush(sg, lane, rb, tc, n_tok, wg.z);
    coopStore(c13, &stage[so], ss);
    flush(sg, lane, rb, td, n_tok, wg.z);
}
