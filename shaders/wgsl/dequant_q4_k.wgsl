// Q4_K (GGUF) on the GPU: super-blocks of 256 with 6-bit scales and minimums per 32, transcoded
// at upload into blocks of 32 laid out as Q4_1 (byte j: element j in the low nibble, j + 16 in
// the high one; 4 quant words a block in `w`) with the block's f32 scale d * sc and minimum
// -dmin * m (two words a block in `s`), computed once on the CPU as ggml does: x = d * q + m,
// exactly the file's values.
@group(0) @binding(3) var<storage, read> w: array<u32>;
const BLOCK: u32 = 32u;

fn q4k_dm(blk: u32) -> vec2<f32> {
    return vec2<f32>(bitcast<f32>(s[2u * blk]), bitcast<f32>(s[2u * blk + 1u]));
}

fn dq_elem(row: u32, col: u32, k: u32) -> f32 {
    let blk = row * (k / BLOCK) + col / BLOCK;
    let i = col % BLOCK;
    let j = i % 16u;
    let byte = (w[blk * 4u + j / 4u] >> ((j % 4u) * 8u)) & 0xffu;
    let q = select(byte & 0xfu, byte >> 4u, i >= 16u);
    let dm = q4k_dm(blk);
    return dm.x * f32(q) + dm.y;
}

fn block_dot(row: u32, b: u32, k: u32, xo: u32) -> f32 {
    let blk = row * (k / BLOCK) + b;
    let dm = q4k_dm(blk);
    var qx = 0.0;
    var sx = 0.0;
    for (var j = 0u; j < 4u; j++) {
        let word = vec4<u32>(w[blk * 4u + j]) >> vec4<u32>(0u, 8u, 16u, 24u);
        let xl = x4(xo + j * 4u);
        let xh = x4(xo + 16u + j * 4u);
        qx += dot(vec4<f32>(word & vec4<u32>(0xfu)), xl) + dot(vec4<f32>((word >> vec4<u32>(4u)) & vec4<u32>(0xfu)), xh);
        sx += dot(xl + xh, vec4<f32>(1.0));
    }
    return dm.x * qx + dm.y * sx;
}

// The matvec's quarter q of a block: word q, elements 4q..4q+3 (low nibbles) and 16+4q..16+4q+3
// (high nibbles).
fn quarter_cols(q: u32) -> vec2<u32> {
    return vec2<u32>(4u * q, 16u + 4u * q);
}

fn quarter_dot(row: u32, b: u32, k: u32, q: u32, xa: vec4<f32>, xb: vec4<f32>) -> f32 {
    let blk = row * (k / BLOCK) + b;
    let dm = q4k_dm(blk);
    let word = vec4<u32>(w[blk * 4u + q]);
    let lo = small_uints_to_f32((word >> vec4<u32>(0u, 8u, 16u, 24u)) & vec4<u32>(0xfu), 0.0);
    let hi = small_uints_to_f32((word >> vec4<u32>(4u, 12u, 20u, 28u)) & vec4<u32>(0xfu), 0.0);
    return dm.x * (dot(lo, xa) + dot(hi, xb)) + dm.y * dot(xa + xb, vec4<f32>(1.0));
}

fn quarter_weights(row: u32, b: u32, k: u32, q: u32) -> mat2x4<f32> {
    let blk = row * (k / BLOCK) + b;
    let dm = q4k_dm(blk);
    let word = vec4<u32>(w[blk * 4u + q]);
    let lo = small_uints_to_f32((word >> vec4<u32>(0u, 8u, 16u, 24u)) & vec4<u32>(0xfu), 0.0);
    let hi = small_uints_to_f32((word >> vec4<u32>(4u, 12u, 20u, 28u)) & vec4<u32>(0xfu), 0.0);
    return mat2x4<f32>(dm.x * lo + dm.y, dm.x * hi + dm.y);
}
