// Q6_K and Q3_K (GGUF) on the GPU: super-blocks of 256 with a signed scale per 16 values,
// transcoded at upload into blocks of 32 signed bytes (8 quant words a block in `w`, the values
// q - 32 of Q6_K or q - 4 of Q3_K in order), each half block under its scale d * sc
// (`q6k_scales`, block_d_q6_k.wgsl): x = d * sc * q, exactly the file's values.
@group(0) @binding(3) var<storage, read> w: array<u32>;
const BLOCK: u32 = 32u;

fn dq_elem(row: u32, col: u32, k: u32) -> f32 {
    let blk = row * (k / BLOCK) + col / BLOCK;
    let i = col % BLOCK;
    let q = extractBits(bitcast<i32>(w[blk * 8u + i / 4u]), (i % 4u) * 8u, 8u);
    return q6k_scales(blk)[i / 16u] * f32(q);
}

fn block_dot(row: u32, b: u32, k: u32, xo: u32) -> f32 {
    let blk = row * (k / BLOCK) + b;
    var qx = vec2<f32>(0.0);
    for (var j = 0u; j < 8u; j++) {
        let q = (vec4<i32>(bitcast<i32>(w[blk * 8u + j])) << vec4<u32>(24u, 16u, 8u, 0u)) >> vec4<u32>(24u);
        qx[j / 4u] += dot(vec4<f32>(q), x4(xo + j * 4u));
    }
    return dot(q6k_scales(blk), qx);
}

// The matvec's quarter q of a block: words 2q and 2q + 1, elements 8q..8q+7 (all in half q / 2).
fn quarter_cols(q: u32) -> vec2<u32> {
    return vec2<u32>(8u * q, 8u * q + 4u);
}

fn q6k_quarter(blk: u32, q: u32) -> mat2x4<f32> {
    // Byte v stands for v - 256 when v >= 128: v ^ 0x80 is the value plus 128.
    let bytes = vec4<u32>(0u, 8u, 16u, 24u);
    let qa = small_uints_to_f32(((vec4<u32>(w[blk * 8u + 2u * q]) >> bytes) & vec4<u32>(0xffu)) ^ vec4<u32>(0x80u), 128.0);
    let qb = small_uints_to_f32(((vec4<u32>(w[blk * 8u + 2u * q + 1u]) >> bytes) & vec4<u32>(0xffu)) ^ vec4<u32>(0x80u), 128.0);
    return mat2x4<f32>(qa, qb);
}

fn quarter_dot(row: u32, b: u32, k: u32, q: u32, xa: vec4<f32>, xb: vec4<f32>) -> f32 {
    let blk = row * (k / BLOCK) + b;
    let m = q6k_quarter(blk, q);
    return q6k_scales(blk)[q / 2u] * (dot(m[0], xa) + dot(m[1], xb));
}

fn quarter_weights(row: u32, b: u32, k: u32, q: u32) -> mat2x4<f32> {
    let blk = row * (k / BLOCK) + b;
    return q6k_scales(blk)[q / 2u] * q6k_quarter(blk, q);
}
