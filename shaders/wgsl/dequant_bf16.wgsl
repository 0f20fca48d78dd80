// BF16 weights: two elements per word (low half first); a bf16 is the top half of an f32.
@group(0) @binding(3) var<storage, read> w: array<u32>;
const BLOCK: u32 = 32u;

fn bf16_at(e: u32) -> f32 {
    let word = w[e >> 1u];
    return bitcast<f32>(select(word << 16u, word & 0xffff0000u, (e & 1u) == 1u));
}

fn dq_elem(row: u32, col: u32, k: u32) -> f32 {
    return bf16_at(row * k + col);
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
