// Q6_K and Q3_K (GGUF) on the GPU: super-blocks of 256 with a signed scale per 16 values,
// transcoded at upload into blocks of 32 six-bit values v = q + 32 in order (Q6_K's q - 32, or
// Q3_K's q - 4, plus 32), 6 words a block in `w` (`q6k_group`, block_d_q6_k.wgsl), each half
// block under its scale d * sc (`q6k_scales`): x = d * sc * (v - 32), exactly the file's values,
// in 6.6 bits a weight.
const BLOCK: u32 = 32u;

// Four 6-bit values as floats v - 32.
fn group_f32(v: u32) -> vec4<f32> {
    return small_uints_to_f32((vec4<u32>(v) >> vec4<u32>(0u, 8u, 16u, 24u)) & vec4<u32>(0xffu), 32.0);
}

fn dq_elem(row: u32, col: u32, k: u32) -> f32 {
    let blk = row * (k / BLOCK) + col / BLOCK;
    let i = col % BLOCK;
    let v = (q6k_group(blk, i / 4u) >> (8u * (i % 4u))) & 0xffu;
    return q6k_scales(blk)[i / 16u] * f32(i32(v) - 32);
}

fn block_dot(row: u32, b: u32, k: u32, xo: u32) -> f32 {
    let blk = row * (k / BLOCK) + b;
    var qx = vec2<f32>(0.0);
    for (var j = 0u; j < 8u; j++) {
        qx[j / 4u] += dot(group_f32(q6k_group(blk, j)), x4(xo + j * 4u));
    }
    return dot(q6k_scales(blk), qx);
}

// The matvec's quarter q of a block: groups 2q and 2q + 1, elements 8q..8q+7 (all in half q / 2).
fn quarter_cols(q: u32) -> vec2<u32> {
    return vec2<u32>(8u * q, 8u * q + 4u);
}

fn q6k_quarter(blk: u32, q: u32) -> mat2x4<f32> {
    return mat2x4<f32>(group_f32(q6k_group(blk, 2u * q)), group_f32(q6k_group(blk, 2u * q + 1u)));
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
