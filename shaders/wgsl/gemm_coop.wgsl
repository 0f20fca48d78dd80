// y[t, off + n] (+)= sum_k x[t, k] * W[n, k] on the adapter's matrix units: gemm.wgsl with its
// 4 x 4 register tiles replaced by cooperative-matrix multiply-adds (16 x 16 x 16, f16 inputs,
// f32 sums), for adapters whose subgroups are 32 lanes and that offer that configuration.
//
// A workgroup of 4 subgroups owns 64 weight rows by 64 tokens; subgroup s owns rows 16s..16s+15
// against all 64 tokens, in four accumulators. For each block of 32 columns the weight tile is
// dequantized once into workgroup memory as f16 (each element through the format's `dq_elem`)
// and the activations are converted beside it; then each subgroup does 2 x 4 multiply-adds. The
// sums leave through workgroup memory, so tile edges and accumulation are plain bounded writes.
// Not batch-invariant, and its f16 inputs round (about 1e-3 relative to the sum of |w x|) and
// overflow beyond 65504: one reason it is not picked by the engine yet.


const TILE: u32 = 64u;
const BK: u32 = 32u;
const WG: u32 = 128u;

// [row][column] of the weight tile and [token][column] of the activations, 32 columns each.
var<workgroup> w_tile: array<f16, 2048>;
var<workgroup> x_tile: array<f16, 2048>;
// [token][row] of the results.
var<workgroup> out_tile: array<f32, 4096>;

@compute @workgroup_size(WG)
fn main(@builtin(local_invocation_index) li: u32, @builtin(workgroup_id) wg: vec3<u32>) {
    let n_tok = step_rows();
    let r0 = wg.x * TILE;
    let t0 = wg.y * TILE;
    let sg = li / 32u;
    // The loader's share: a row (or token) of the tile and 16 consecutive columns.
    let ld = li / 2u;
    let lc = (li % 2u) * 16u;
    let w_row = min(r0 + ld, p.n - 1u);
    let x_tok = min(t0 + ld, max(n_tok, 1u) - 1u);

    var acc0 = coop_mat16x16<f32, C>();
    var acc1 = coop_mat16x16<f32, C>();
    var acc2 = coop_mat16x16<f32, C>();
    var acc3 = coop_mat16x16<f32, C>();
    for (var kb = 0u; kb < p.k; kb += BK) {
        for (var c = 0u; c < 16u; c++) {
            let col = kb + lc + c;
            let inside = col < p.k;
            let safe = min(col, p.k - 1u);
            w_tile[ld * BK + lc + c] = f16(select(0.0, dq_elem(w_row, safe, p.k), inside));
            x_tile[ld * BK + lc + c] = f16(select(0.0, x[x_tok * p.x_stride + safe], inside));
        }
        workgroupBarrier();
        for (var kk = 0u; kk < BK; kk += 16u) {
            let a = coopLoadT<coop_mat16x16<f16, A>>(&w_tile[sg * 16u * BK + kk], BK);
            // B[k][t] = x_tile[t][k]: the activations read column-major.
            acc0 = coopMultiplyAdd(a, coopLoad<coop_mat16x16<f16, B>>(&x_tile[kk], BK), acc0);
            acc1 = coopMultiplyAdd(a, coopLoad<coop_mat16x16<f16, B>>(&x_tile[16u * BK + kk], BK), acc1);
            acc2 = coopMultiplyAdd(a, coopLoad<coop_mat16x16<f16, B>>(&x_tile[32u * BK + kk], BK), acc2);
            acc3 = coopMultiplyAdd(a, coopLoad<coop_mat16x16<f16, B>>(&x_tile[48u * BK + kk], BK), acc3);
        }
        workgroupBarrier();
    }

    // C[row][token] into out_tile[token][row] (column-major). naga 30's SPIR-V writer needs every
    // non-literal argument of coopStore bound to a name first.
    let stride = TILE;
    let o0 = sg * 16u;
    let o1 = o0 + 16u * TILE;
    let o2 = o0 + 32u * TILE;
    let o3 = o0 + 48u * TILE;
    coopStore(acc0, &out_tile[o0], stride);
    coopStore(acc1, &out_tile[o1], stride);
    coopStore(acc2, &out_tile[o2], stride);
    coopStore(acc3, &out_tile[o3], stride);
    workgroupBarrier();
    for (var i = li; i < TILE * TILE; i += WG) {
        let t = t0 + i / TILE;
        let row = r0 + i % TILE;
        if (row < p.n && t < n_tok) {
            store_y(t, row, out_tile[i]);
        }
    }
}
