// y[t, off + n] (+)= sum_k x[t, k] * W[n, k] for a step of many tokens (prefill, large batches):
// a workgroup-tiled GEMM for adapters without matrix units.
//
// A workgroup of 256 lanes owns a tile of 64 weight rows by 64 tokens. For each block of 32
// columns it dequantizes the weight tile once into workgroup memory (each element through the
// format's `dq_elem`) and copies the activations beside it; then each lane accumulates a 4 x 4
// sub-tile from vec4 reads of both, 16 multiply-adds per pair of reads. Weights are read from
// memory once per 64 tokens instead of once per 8 (matmul.wgsl). Not batch-invariant: the
// engine uses it only outside deterministic mode.


const TILE: u32 = 64u;
const BK: u32 = 32u;

// [column][row / 4] of the tile, four rows (or tokens) per vec4.
var<workgroup> w_tile: array<vec4<f32>, 512>;
var<workgroup> x_tile: array<vec4<f32>, 512>;

@compute @workgroup_size(16, 16)
fn main(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(local_invocation_index) li: u32, @builtin(workgroup_id) wg: vec3<u32>) {
    let n_tok = step_rows();
    let r0 = wg.x * TILE;
    let t0 = wg.y * TILE;
    // The loader's share: 4 consecutive rows (or tokens) 4g..4g+3 of the tile at columns c0
    // and c0 + 1, written as whole vec4s (lanes writing components of one vector would race).
    // The 16 lanes of a row quad take the 32 columns side by side, so each row is read
    // contiguously (lanes on the same columns of different rows made the loads scattered and the
    // kernel 6x slower).
    let g = li / 16u;
    let c0 = (li % 16u) * 2u;
    let last_tok = max(n_tok, 1u) - 1u;

    var acc: array<vec4<f32>, 4>;
    for (var kb = 0u; kb < p.k; kb += BK) {
        for (var c = c0; c < c0 + 2u; c++) {
            let col = kb + c;
            let inside = col < p.k;
            let safe = min(col, p.k - 1u);
            var wv = vec4<f32>(0.0);
            var xv = vec4<f32>(0.0);
            for (var i = 0u; i < 4u; i++) {
                let row = min(r0 + 4u * g + i, p.n - 1u);
                let tok = min(t0 + 4u * g + i, last_tok);
                wv[i] = select(0.0, dq_elem(row, safe, p.k), inside);
                xv[i] = select(0.0, x[tok * p.x_stride + safe], inside);
            }
            w_tile[c * 16u + g] = wv;
            x_tile[c * 16u + g] = xv;
        }
        workgroupBarrier();
        for (var kk = 0u; kk < BK; kk++) {
            let a = w_tile[kk * 16u + lid.y];
            let b = x_tile[kk * 16u + lid.x];
            acc[0] += a.x * b;
            acc[1] += a.y * b;
            acc[2] += a.z * b;
            acc[3] += a.w * b;
        }
        workgroupBarrier();
    }

    for (var i = 0u; i < 4u; i++) {
        let row = r0 + lid.y * 4u + i;
        for (var j = 0u; j < 4u; j++) {
            let t = t0 + lid.x * 4u + j;
            if (row < p.n && t < n_tok) {
                store_y(t, row, acc[i][j]);
            }
        }
    }
}
