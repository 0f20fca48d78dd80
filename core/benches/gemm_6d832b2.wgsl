// y[t, off + n] (+)= sum_k x[t, k] * W[n, k] for a step of many tokens (prefill, large batches):
// a workgroup-tiled GEMM for adapters without matrix units.
//
// A workgroup of 256 lanes owns a tile of 64 weight rows by 64 tokens. For each block of 32
// columns it dequantizes the weight tile once into workgroup memory (each element through the
// format's `dq_elem`) and copies the activations beside it; then each lane accumulates a 4 x 4
// sub-tile from vec4 reads of both, 16 multiply-adds per pair of reads. Weights are read from
// memory once per 64 tokens instead of once per 8 (matmul.wgsl). Not batch-invariant: the
// engine uses it only outside deterministic mode.

struct MatmulParams {
    n: u32,
    k: u32,
    y_stride: u32,
    x_stride: u32,
    y_offset: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

override ACCUMULATE: bool = false;
override SAMPLE_ROWS: bool = false;

const TILE: u32 = 64u;
const BK: u32 = 32u;

@group(0) @binding(0) var<uniform> step: Step;
@group(0) @binding(1) var<uniform> p: MatmulParams;
@group(0) @binding(2) var<storage, read> x: array<f32>;
@group(0) @binding(4) var<storage, read> s: array<u32>;
@group(0) @binding(5) var<storage, read_write> y: array<f32>;
@group(0) @binding(6) var<storage, read> x_vec: array<vec4<f32>>;

fn x4(o: u32) -> vec4<f32> {
    return x_vec[o >> 2u];
}

// [column][row / 4] of the tile, four rows (or tokens) per vec4.
var<workgroup> w_tile: array<vec4<f32>, 512>;
var<workgroup> x_tile: array<vec4<f32>, 512>;

@compute @workgroup_size(16, 16)
fn main(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(local_invocation_index) li: u32, @builtin(workgroup_id) wg: vec3<u32>) {
    var n_tok = step.n_tokens;
    if (SAMPLE_ROWS) {
        n_tok = step.n_sample;
    }
    let r0 = wg.x * TILE;
    let t0 = wg.y * TILE;
    // The loader's element: a row (or token) of the tile and 8 consecutive columns.
    let ld = li / 4u;
    let lc = (li % 4u) * 8u;
    let w_row = min(r0 + ld, p.n - 1u);
    let x_tok = min(t0 + ld, max(n_tok, 1u) - 1u);

    var acc: array<vec4<f32>, 4>;
    for (var kb = 0u; kb < p.k; kb += BK) {
        for (var c = 0u; c < 8u; c++) {
            let col = kb + lc + c;
            let inside = col < p.k;
            let safe = min(col, p.k - 1u);
            w_tile[(lc + c) * 16u + ld / 4u][ld % 4u] = select(0.0, dq_elem(w_row, safe, p.k), inside);
            x_tile[(lc + c) * 16u + ld / 4u][ld % 4u] = select(0.0, x[x_tok * p.x_stride + safe], inside);
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
                let o = t * p.y_stride + p.y_offset + row;
                if (ACCUMULATE) {
                    y[o] += acc[i][j];
                } else {
                    y[o] = acc[i][j];
                }
            }
        }
    }
}
