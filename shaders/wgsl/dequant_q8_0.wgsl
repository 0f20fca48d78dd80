// Q8_0 (GGUF): blocks of 32 signed bytes with one f16 scale, x = d * q.
// Repacked at upload into 8 quant words per block (`w`) and the f16 scales two per word (`s`),
// so every load is an aligned u32; the bytes themselves are the file's.
@group(0) @binding(3) var<storage, read> w: array<u32>;
const BLOCK: u32 = 32u;

fn q8_scale(blk: u32) -> f32 {
    return unpack2x16float(s[blk >> 1u])[blk & 1u];
}

fn dq_elem(row: u32, col: u32, k: u32) -> f32 {
    let blk = row * (k / BLOCK) + col / BLOCK;
    let i = col % BLOCK;
    let word = w[blk * 8u + i / 4u];
    let q = extractBits(bitcast<i32>(word), (i % 4u) * 8u, 8u);
    return q8_scale(blk) * f32(q);
}

fn block_dot(row: u32, b: u32, k: u32, xo: u32) -> f32 {
    let blk = row * (k / BLOCK) + b;
    var qx = 0.0;
    for (var j = 0u; j < 8u; j++) {
        let q = (vec4<i32>(bitcast<i32>(w[blk * 8u + j])) << vec4<u32>(24u, 16u, 8u, 0u)) >> vec4<u32>(24u);
        qx += dot(vec4<f32>(q), x4(xo + j * 4u));
    }
    return q8_scale(blk) * qx;
}

// The matvec's quarter q of a block: words 2q and 2q + 1, elements 8q..8q+7.
fn quarter_cols(q: u32) -> vec2<u32> {
    return vec2<u32>(8u * q, 8u * q + 4u);
}

fn quarter_dot(row: u32, b: u32, k: u32, q: u32, xa: vec4<f32>, xb: vec4<f32>) -> f32 {
    let blk = row * (k / BLOCK) + b;
    // Byte v stands for v - 256 when v >= 128: v ^ 0x80 is the value plus 128.
    let bytes = vec4<u32>(0u, 8u, 16u, 24u);
    let qa = small_uints_to_f32(((vec4<u32>(w[blk * 8u + 2u * q]) >> bytes) & vec4<u32>(0xffu)) ^ vec4<u32>(0x80u), 128.0);
    let qb = small_uints_to_f32(((vec4<u32>(w[blk * 8u + 2u * q + 1u]) >> bytes) & vec4<u32>(0xffu)) ^ vec4<u32>(0x80u), 128.0);
    return q8_scale(blk) * (dot(qa, xa) + dot(qb, xb));
}

// Quarter q of a block as weights (the columns of `quarter_cols`), for the tiled GEMMs' loaders.
fn quarter_weights(row: u32, b: u32, k: u32, q: u32) -> mat2x4<f32> {
    let blk = row * (k / BLOCK) + b;
    let d = q8_scale(blk);
    let bytes = vec4<u32>(0u, 8u, 16u, 24u);
    let qa = small_uints_to_f32(((vec4<u32>(w[blk * 8u + 2u * q]) >> bytes) & vec4<u32>(0xffu)) ^ vec4<u32>(0x80u), 128.0);
    let qb = small_uints_to_f32(((vec4<u32>(w[blk * 8u + 2u * q + 1u]) >> bytes) & vec4<u32>(0xffu)) ^ vec4<u32>(0x80u), 128.0);
    return mat2x4<f32>(d * qa, d * qb);
}
