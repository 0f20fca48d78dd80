// F16 weights: rows of `k` halves back to back (a row may start mid-word when `k` is odd). The
// halves are read through `half_at`/`half4_at`, from f16_words.wgsl (u32 words unpacked) or
// f16_native.wgsl (WGSL `f16`, on SHADER_F16 adapters); both sum in the same order.
const BLOCK: u32 = 32u;

fn dq_elem(row: u32, col: u32, k: u32) -> f32 {
    return half_at(row * k + col);
}

fn block_dot(row: u32, b: u32, k: u32, xo: u32) -> f32 {
    let base = b * BLOCK;
    let e = row * k + base;
    var sum = 0.0;
    if (k % 4u == 0u && base + BLOCK <= k) {
        // Whole block of a row starting on an 8-byte boundary: 4 elements per step. Which path
        // a block takes depends only on the weight's shape, never on the batch.
        for (var i = 0u; i < BLOCK; i += 4u) {
            sum += dot(half4_at(e + i), x4(xo + i));
        }
        return sum;
    }
    for (var i = 0u; i < min(BLOCK, k - base); i++) {
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
    return dot(half4_at(e), xa) + dot(half4_at(e + 4u), xb);
}

// Quarter q of a block as weights (the columns of `quarter_cols`), for the tiled GEMMs' loaders.
fn quarter_weights(row: u32, b: u32, k: u32, q: u32) -> mat2x4<f32> {
    let e = row * k + b * BLOCK + 8u * q;
    return mat2x4<f32>(half4_at(e), half4_at(e + 4u));
}
