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

// The matvec's quarter q of a block, elements 8q..8q+7 (rows a whole number of blocks long).
fn quarter_cols(q: u32) -> vec2<u32> {
    return vec2<u32>(8u * q, 8u * q + 4u);
}

fn bf16_4(e: u32) -> vec4<f32> {
    let a = w[e >> 1u];
    let b = w[(e >> 1u) + 1u];
    return bitcast<vec4<f32>>(vec4<u32>(a << 16u, a & 0xffff0000u, b << 16u, b & 0xffff0000u));
}

fn quarter_dot(row: u32, b: u32, k: u32, q: u32, xa: vec4<f32>, xb: vec4<f32>) -> f32 {
    let e = row * k + b * BLOCK + 8u * q;
    return dot(bf16_4(e), xa) + dot(bf16_4(e + 4u), xb);
}

// Quarter q of a block as weights (the columns of `quarter_cols`), for the tiled GEMMs' loaders.
fn quarter_weights(row: u32, b: u32, k: u32, q: u32) -> mat2x4<f32> {
    let e = row * k + b * BLOCK + 8u * q;
    return mat2x4<f32>(bf16_4(e), bf16_4(e + 4u));
}
