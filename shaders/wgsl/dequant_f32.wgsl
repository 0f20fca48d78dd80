// F32 weights: one element per word, rows of `k` elements back to back.
@group(0) @binding(3) var<storage, read> w: array<u32>;
const BLOCK: u32 = 32u;

fn dq_elem(row: u32, col: u32, k: u32) -> f32 {
    return bitcast<f32>(w[row * k + col]);
}

fn block_dot(row: u32, b: u32, k: u32, xo: u32) -> f32 {
    let base = b * BLOCK;
    let cnt = min(BLOCK, k - base);
    var sum = 0.0;
    for (var i = 0u; i < cnt; i++) {
        sum += dq_elem(row, base + i, k) * x[xo + i];
    }
    return sum;
}
