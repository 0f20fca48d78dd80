// y[t, off + n] (+)= sum_k x[t, k] * W[n, k] for a step of many tokens (prefill, large batches):
// a workgroup-tiled GEMM for adapters without matrix units.
//
// A workgroup of 256 lanes owns a tile of 64 weight rows by 64 tokens. For each block of 32
// columns it dequantizes the weight tile once into workgroup memory (each element through the
// format's `dq_elem`) and copies the activations beside it; then each lane accumulates a 4 x 4
// sub-tile (rows 16i + y, tokens 16j + x) from four-column vectors of both, 16 dot products per
// 8 reads. Weights are read from
// memory once per 64 tokens instead of once per 8 (matmul.wgsl). Not batch-invariant: the
// engine uses it only outside deterministic mode.


const TILE: u32 = 64u;
const BK: u32 = 32u;

// [row][column / 4] of the tiles, four columns per vec4, rows padded to 9 vectors so neither
// the loader's stores nor the sub-tile reads meet on a bank. Each vector is written whole by
// one lane (lanes writing components of one vector would race).
const ROW: u32 = 9u;
var<workgroup> w_tile: array<vec4<f32>, 576>;
var<workgroup> x_tile: array<vec4<f32>, 576>;

@compute @workgroup_size(16, 16)
fn main(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(local_invocation_index) li: u32, @builtin(workgroup_id) wg: vec3<u32>) {
    let n_tok = step_rows();
    let r0 = wg.x * TILE;
    let t0 = wg.y * TILE;
    // The loader's share: one row (or token) of the tile and 8 consecutive columns, so its
    // loads are contiguous (other splits measured 6-7x slower on the H200).
    let ld = li / 4u;
    let lc = (li % 4u) * 8u;
    let w_row = min(r0 + ld, p.n - 1u);
    let x_tok = min(t0 + ld, max(n_tok, 1u) - 1u);

    var acc: array<vec4<f32>, 4>;
    for (var kb = 0u; kb < p.k; kb += BK) {
        for (var h = 0u; h < 2u; h++) {
            var wv: array<f32, 4>;
            var xv: array<f32, 4>;
            for (var c = 0u; c < 4u; c++) {
                let col = kb + lc + 4u * h + c;
                let inside = col < p.k;
                let safe = min(col, p.k - 1u);
                wv[c] = select(0.0, dq_elem(w_row, safe, p.k), inside);
                xv[c] = select(0.0, x[x_tok * p.x_stride + safe], inside);
            }
            w_tile[ld * ROW + lc / 4u + h] = vec4<f32>(wv[0], wv[1], wv[2], wv[3]);
            x_tile[ld * ROW + lc / 4u + h] = vec4<f32>(xv[0], xv[1], xv[2], xv[3]);
        }
        workgroupBarrier();
        // Rows 16i + lid.y and tokens 16j + lid.x of the tile, four columns per step.
        for (var kq = 0u; kq < BK / 4u; kq++) {
            var a: array<vec4<f32>, 4>;
            var b: array<vec4<f32>, 4>;
            for (var i = 0u; i < 4u; i++) {
                a[i] = w_tile[(16u * i + lid.y) * ROW + kq];
                b[i] = x_tile[(16u * i + lid.x) * ROW + kq];
            }
            for (var i = 0u; i < 4u; i++) {
                acc[i] += vec4<f32>(dot(a[i], b[0]), dot(a[i], b[1]), dot(a[i], b[2]), dot(a[i], b[3]));
            }
        }
        workgroupBarrier();
    }

    for (var i = 0u; i < 4u; i++) {
        let row = r0 + 16u * i + lid.y;
        for (var j = 0u; j < 4u; j++) {
            let t = t0 + 16u * j + lid.x;
            if (row < p.n && t < n_tok) {
                store_y(t, row, acc[i][j]);
            }
        }
    }
}
