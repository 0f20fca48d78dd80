// F32 weights: one element per word, rows of `k` elements back to back.
const BLOCK: u32 = 32u;

fn dq_elem(row: u32, col: u32, k: u32) -> f32 {
    return bitcast<f32>(w[row * k + col]);
}

fn dq_block(row: u32, b: u32, k: u32) -> array<f32, 32> {
    var out: array<f32, 32>;
    let base = b * BLOCK;
    let cnt = min(BLOCK, k - base);
    for (var i = 0u; i < cnt; i++) {
        out[i] = bitcast<f32>(w[row * k + base + i]);
    }
    return out;
}
