// F16 weights: two elements per word (low half first), rows of `k` elements back to back, so a
// row may start in the middle of a word when `k` is odd.
const BLOCK: u32 = 32u;

fn dq_elem(row: u32, col: u32, k: u32) -> f32 {
    let e = row * k + col;
    return unpack2x16float(w[e >> 1u])[e & 1u];
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
