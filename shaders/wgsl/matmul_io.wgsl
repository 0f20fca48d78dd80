// What every matmul kernel (matmul, matvec, gemm, gemm_coop) shares: the weight part's shape,
// the bindings around the weight words, and how a result leaves. y[t, y_offset + n] (+)=
// sum_k x[t, k] * W[n, k].

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

// Add into y (residual connections) instead of overwriting it.
override ACCUMULATE: bool = false;
// The rows are the step's sampled rows (the output head), not all its tokens.
override SAMPLE_ROWS: bool = false;

@group(0) @binding(0) var<uniform> step: Step;
@group(0) @binding(1) var<uniform> p: MatmulParams;
// Bindings 2 and 6, the activations, are declared by matmul_x.wgsl (f32) or matvec_q8.wgsl (8-bit);
// binding 3, the weight words `w`, by the format's dequantization module.
@group(0) @binding(4) var<storage, read> s: array<u32>;
@group(0) @binding(5) var<storage, read_write> y: array<f32>;

/// Tokens (rows of x and y) in this step.
fn step_rows() -> u32 {
    if (SAMPLE_ROWS) {
        return step.n_sample;
    }
    return step.n_tokens;
}

/// Writes (or adds) one result of row `row` for token `t`.
fn store_y(t: u32, row: u32, v: f32) {
    let o = t * p.y_stride + p.y_offset + row;
    if (ACCUMULATE) {
        y[o] += v;
    } else {
        y[o] = v;
    }
}
