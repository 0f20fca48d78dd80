// Q4_1 (GGUF): blocks of 32 four-bit values with an f16 scale and an f16 minimum,
// x = d * q + m. Byte j holds element j (low nibble) and element j + 16 (high nibble).
// Repacked at upload into 4 quant words per block (`w`) and the block's (d, m) in `s`, read by
// `block_dm`: one f16 pair a word for Q4_1 (block_dm_f16.wgsl), Q4_K's super-block scales as the
// file holds them for its blocks of 32 (block_dm_k.wgsl).
@group(0) @binding(3) var<storage, read> w: array<u32>;
const BLOCK: u32 = 32u;

fn dq_elem(row: u32, col: u32, k: u32) -> f32 {
    let blk = row * (k / BLOCK) + col / BLOCK;
    let i = col % BLOCK;
    let j = i % 16u;
    let byte = (w[blk * 4u + j / 4u] >> ((j % 4u) * 8u)) & 0xffu;
    let q = select(byte & 0xfu, byte >> 4u, i >= 16u);
    let dm = block_dm(blk);
    return dm.x * f32(q) + dm.y;
}

fn block_dot(row: u32, b: u32, k: u32, xo: u32) -> f32 {
    let blk = row * (k / BLOCK) + b;
    let dm = block_dm(blk);
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
// (high nibbles), dotted with their activations `xa` and `xb`.
fn quarter_cols(q: u32) -> vec2<u32> {
    return vec2<u32>(4u * q, 16u + 4u * q);
}

fn quarter_dot(row: u32, b: u32, k: u32, q: u32, xa: vec4<f32>, xb: vec4<f32>) -> f32 {
    let blk = row * (k / BLOCK) + b;
    let dm = block_dm(blk);
    let word = vec4<u32>(w[blk * 4u + q]);
    let lo = small_uints_to_f32((word >> vec4<u32>(0u, 8u, 16u, 24u)) & vec4<u32>(0xfu), 0.0);
    let hi = small_uints_to_f32((word >> vec4<u32>(4u, 12u, 20u, 28u)) & vec4<u32>(0xfu), 0.0);
    return dm.x * (dot(lo, xa) + dot(hi, xb)) + dm.y * dot(xa + xb, vec4<f32>(1.0));
}

// Quarter q of a block as weights (the columns of `quarter_cols`), for the tiled GEMMs' loaders.
fn quarter_weights(row: u32, b: u32, k: u32, q: u32) -> mat2x4<f32> {
    let blk = row * (k / BLOCK) + b;
    let dm = block_dm(blk);
    let word = vec4<u32>(w[blk * 4u + q]);
    let lo = small_uints_to_f32((word >> vec4<u32>(0u, 8u, 16u, 24u)) & vec4<u32>(0xfu), 0.0);
    let hi = small_uints_to_f32((word >> vec4<u32>(4u, 12u, 20u, 28u)) & vec4<u32>(0xfu), 0.0);
    return mat2x4<f32>(dm.x * lo + dm.y, dm.x * hi + dm.y);
}
