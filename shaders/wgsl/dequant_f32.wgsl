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

// The matvec's quarter q of a block, elements 8q..8q+7 (rows a whole number of blocks long).
fn quarter_cols(q: u32) -> vec2<u32> {
    return vec2<u32>(8u * q, 8u * q + 4u);
}

fn quarter_dot(row: u32, b: u32, k: u32, q: u32, xa: vec4<f32>, xb: vec4<f32>) -> f32 {
    let e = row * k + b * BLOCK + 8u * q;
    let wa = bitcast<vec4<f32>>(vec4<u32>(w[e], w[e + 1u], w[e + 2u], w[e + 3u]));
    let wb = bitcast<vec4<f32>>(vec4<u32>(w[e + 4u], w[e + 5u], w[e + 6u], w[e + 7u]));
    return dot(wa, xa) + dot(wb, xb);
}

// Quarter q of a block as weights (the columns of `quarter_cols`), for the tiled GEMMs' loaders.
fn quarter_weights(row: u32, b: u32, k: u32, q: u32) -> mat2x4<f32> {
    let e = row * k + b * BLOCK + 8u * q;
    return mat2x4<f32>(
        bitcast<vec4<f32>>(vec4<u32>(w[e], w[e + 1u], w[e + 2u], w[e + 3u])),
        bitcast<vec4<f32>>(vec4<u32>(w[e + 4u], w[e + 5u], w[e + 6u], w[e + 7u])),
    );
}
