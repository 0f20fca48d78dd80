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

struct MatmulParams {
    // Rows of this weight part.
    n: u32,
    // Columns (the reduction length).
    k: u32,
    // Elements between consecutive tokens' rows in y and in x.
    y_stride: u32,
    x_stride: u32,
    // Column of y that row 0 of this part writes to.
    y_offset: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

override SPLIT: u32 = 1u;
override TILE_T: u32 = 8u;
override ACCUMULATE: bool = false;
override SAMPLE_ROWS: bool = false;

const WG: u32 = 64u;
const MAX_TILE: u32 = 8u;

@group(0) @binding(0) var<uniform> step: Step;
@group(0) @binding(1) var<uniform> p: MatmulParams;
@group(0) @binding(2) var<storage, read> x: array<f32>;
// Binding 3, the weight words `w`, is declared by the format's dequantization module.
@group(0) @binding(4) var<storage, read> s: array<u32>;
@group(0) @binding(5) var<storage, read_write> y: array<f32>;
// The same buffer as `x`, for the 16-byte loads of block formats (their rows are 32-aligned).
@group(0) @binding(6) var<storage, read> x_vec: array<vec4<f32>>;

/// x[o..o+4] for o a multiple of 4.
fn x4(o: u32) -> vec4<f32> {
    return x_vec[o >> 2u];
}

@compute @workgroup_size(WG)
fn main(@builtin(local_invocation_index) li: u32, @builtin(workgroup_id) wg: vec3<u32>) {
    let lane = li % SPLIT;
    let row = wg.x * (WG / SPLIT) + li / SPLIT;
    var n_tok = step.n_tokens;
    if (SAMPLE_ROWS) {
        n_tok = step.n_sample;
    }
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
            let o = (t0 + tt) * p.y_stride + p.y_offset + row;
            if (ACCUMULATE) {
                y[o] += acc[tt];
            } else {
                y[o] = acc[tt];
            }
        }
    }
}
