// y[t, off + n] (+)= sum_k x[t, k] * W[n, k] on the adapter's matrix units (cooperative-matrix
// multiply-adds, 16 x 16 x 16, f16 inputs, f32 sums), for adapters whose subgroups are 32 lanes
// and that offer that configuration. Rows must be a whole number of 32-column blocks long.
//
// A workgroup of 8 subgroups owns 128 weight rows by 128 tokens; subgroup s owns rows
// 32 (s % 4).. + 31 against tokens 64 (s / 4).. + 63, in eight accumulators, so each pair of
// fragment loads feeds two multiply-adds or more. For each block of 32 columns the loader
// dequantizes the weight tile once into workgroup memory as f16, a quarter block per call of the
// format's `quarter_weights` (one word and one scale for 8 weights), and converts the activations
// beside it. The sums leave through a per-subgroup staging tile, so tile edges and accumulation
// are plain bounded writes. Not batch-invariant, and its f16 inputs round (about 1e-3 relative
// to the sum of |w x|) and overflow beyond 65504.


const TILE: u32 = 128u;
const BK: u32 = 32u;
// Row stride of the f16 tiles: 32 columns padded by 8, so fragment loads of consecutive rows
// fall on different banks.
const LD: u32 = 40u;
const WG: u32 = 256u;

// [row][column] of the weight tile and [token][column] of the activations.
var<workgroup> w_tile: array<f16, 5120>;
var<workgroup> x_tile: array<f16, 5120>;
// One 16 x 16 result per subgroup on its way out, [token][row].
var<workgroup> stage: array<f32, 2048>;

/// Writes the subgroup's staged 16 x 16 results for rows r.. and tokens t.. (bounded), then
/// waits so the stage can be reused. Called by every lane.
fn flush(sg: u32, lane: u32, r: u32, t: u32, n_tok: u32) {
    workgroupBarrier();
    for (var e = lane; e < 256u; e += 32u) {
        let row = r + e % 16u;
        let tok = t + e / 16u;
        if (row < p.n && tok < n_tok) {
            store_y(tok, row, stage[sg * 256u + e]);
        }
    }
    workgroupBarrier();
}

@compute @workgroup_size(WG)
fn main(@builtin(local_invocation_index) li: u32, @builtin(workgroup_id) wg: vec3<u32>) {
    let n_tok = step_rows();
    let r0 = wg.x * TILE;
    let t0 = wg.y * TILE;
    let sg = li / 32u;
    let lane = li % 32u;
    let sr = (sg % 4u) * 32u;
    let st = (sg / 4u) * 64u;
    // The loader's share: half a block (two quarters) of one weight row, and 16 columns of one
    // token's activations.
    let ld = li / 2u;
    let half = li % 2u;
    let w_row = min(r0 + ld, p.n - 1u);
    let x_tok = min(t0 + ld, max(n_tok, 1u) - 1u);
    let nb = p.k / BK;

    var c00 = coop_mat16x16<f32, C>();
    var c01 = coop_mat16x16<f32, C>();
    var c02 = coop_mat16x16<f32, C>();
    var c03 = coop_mat16x16<f32, C>();
    var c10 = coop_mat16x16<f32, C>();
    var c11 = coop_mat16x16<f32, C>();
    var c12 = coop_mat16x16<f32, C>();
    var c13 = coop_mat16x16<f32, C>();
    for (var b = 0u; b < nb; b++) {
        for (var qq = 0u; qq < 2u; qq++) {
            let q = half * 2u + qq;
            let cols = quarter_cols(q);
            let m = quarter_weights(w_row, b, p.k, q);
            for (var i = 0u; i < 4u; i++) {
                w_tile[ld * LD + cols.x + i] = f16(m[0][i]);
                w_tile[ld * LD + cols.y + i] = f16(m[1][i]);
            }
        }
        let xo = x_tok * p.x_stride + b * BK + half * 16u;
        for (var j = 0u; j < 4u; j++) {
            let v = x4(xo + 4u * j);
            for (var i = 0u; i < 4u; i++) {
                x_tile[ld * LD + half * 16u + 4u * j + i] = f16(v[i]);
            }
        }
        workgroupBarrier();
        for (var kk = 0u; kk < BK; kk += 16u) {
            let a0 = coopLoadT<coop_mat16x16<f16, A>>(&w_tile[sr * LD + kk], LD);
            let a1 = coopLoadT<coop_mat16x16<f16, A>>(&w_tile[(sr + 16u) * LD + kk], LD);
            // B[k][t] = x_tile[t][k]: the activations read column-major.
            let b0 = coopLoad<coop_mat16x16<f16, B>>(&x_tile[st * LD + kk], LD);
            let b1 = coopLoad<coop_mat16x16<f16, B>>(&x_tile[(st + 16u) * LD + kk], LD);
            let b2 = coopLoad<coop_mat16x16<f16, B>>(&x_tile[(st + 32u) * LD + kk], LD);
            let b3 = coopLoad<coop_mat16x16<f16, B>>(&x_tile[(st + 48u) * LD + kk], LD);
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
    flush(sg, lane, ra, ta, n_tok);
    coopStore(c01, &stage[so], ss);
    flush(sg, lane, ra, tb, n_tok);
    coopStore(c02, &stage[so], ss);
    flush(sg, lane, ra, tc, n_tok);
    coopStore(c03, &stage[so], ss);
    flush(sg, lane, ra, td, n_tok);
    coopStore(c10, &stage[so], ss);
    flush(sg, lane, rb, ta, n_tok);
    coopStore(c11, &stage[so], ss);
    flush(sg, lane, rb, tb, n_tok);
    coopStore(c12, &stage[so], ss);
    flush(sg, lane, rb, tc, n_tok);
    coopStore(c13, &stage[so], ss);
    flush(sg, lane, rb, td, n_tok);
}
