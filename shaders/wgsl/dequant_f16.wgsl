// F16 weights: two elements per word (low half first), rows of `k` elements back to back, so a
// row may start in the middle of a word when `k` is odd.
@group(0) @binding(3) var<storage, read> w: array<u32>;
const BLOCK: u32 = 32u;

fn dq_elem(row: u32, col: u32, k: u32) -> f32 {
    let e = row * k + col;
    return unpack2x16float(w[e >> 1u])[e & 1u];
}

fn block_dot(row: u32, b: u32, k: u32, xo: u32) -> f32 {
    let base = b * BLOCK;
    let e = row * k + base;
    var sum = 0.0;
    if (k % 4u == 0u && base + BLOCK <= k) {
        // Whole block of a row starting on an 8-byte boundary: 4 elements per step. Which path
        // a block takes depends only on the weight's shape, never on the batch.
        for (var i = 0u; i < BLOCK; i += 4u) {
            let h = e + i;
            let v = vec4<f32>(unpack2x16float(w[h >> 1u]), unpack2x16float(w[(h >> 1u) + 1u]));
            sum += dot(v, x4(xo + i));
        }
        return sum;
    }
    for (var i = 0u; i < min(BLOCK, k - base); i++) {
        sum += dq_elem(row, base + i, k) * x[xo + i];
    }
    return sum;
}
