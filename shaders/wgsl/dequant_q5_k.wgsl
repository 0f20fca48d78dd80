// Q5_K and Q5_1 (GGUF) on the GPU: values 0..31 under a scale and a minimum per 32 (Q5_K's
// 6-bit scales and minimums times its super-block's d and dmin), transcoded at upload into
// blocks of 32 bytes (8 quant words a block in `w`), the scales kept as the file holds them and
// read by `block_dm` (block_dm_k.wgsl for Q5_K, block_dm_f16.wgsl for Q5_1): x = d * q + m,
// exactly the file's values.
@group(0) @binding(3) var<storage, read> w: array<u32>;
const BLOCK: u32 = 32u;

fn dq_elem(row: u32, col: u32, k: u32) -> f32 {
    let blk = row * (k / BLOCK) + col / BLOCK;
    let i = col % BLOCK;
    let q = (w[blk * 8u + i / 4u] >> ((i % 4u) * 8u)) & 0xffu;
    let dm = block_dm(blk);
    return dm.x * f32(q) + dm.y;
}

fn block_dot(row: u32, b: u32, k: u32, xo: u32) -> f32 {
    let blk = row * (k / BLOCK) + b;
    var qx = 0.0;
    var sx = 0.0;
    for (var j = 0u; j < 8u; j++) {
        let q = (vec4<u32>(w[blk * 8u + j]) >> vec4<u32>(0u, 8u, 16u, 24u)) & vec4<u32>(0xffu);
        let x = x4(xo + j * 4u);
        qx += dot(vec4<f32>(q), x);
        sx += dot(x, vec4<f32>(1.0));
    }
    let dm = block_dm(blk);
    return dm.x * qx + dm.y * sx;
}

// The matvec's quarter q of a block: words 2q and 2q + 1, elements 8q..8q+7.
fn quarter_cols(q: u32) -> vec2<u32> {
    return vec2<u32>(8u * q, 8u * q + 4u);
}

fn q5k_quarter(blk: u32, q: u32) -> mat2x4<f32> {
    let bytes = vec4<u32>(0u, 8u, 16u, 24u);
    let qa = small_uints_to_f32((vec4<u32>(w[blk * 8u + 2u * q]) >> bytes) & vec4<u32>(0xffu), 0.0);
    let qb = small_uints_to_f32((vec4<u32>(w[blk * 8u + 2u * q + 1u]) >> bytes) & vec4<u32>(0xffu), 0.0);
    return mat2x4<f32>(qa, qb);
}

fn quarter_dot(row: u32, b: u32, k: u32, q: u32, xa: vec4<f32>, xb: vec4<f32>) -> f32 {
    let blk = row * (k / BLOCK) + b;
    let dm = block_dm(blk);
    let m = q5k_quarter(blk, q);
    return dm.x * (dot(m[0], xa) + dot(m[1], xb)) + dm.y * dot(xa + xb, vec4<f32>(1.0));
}

fn quarter_weights(row: u32, b: u32, k: u32, q: u32) -> mat2x4<f32> {
    let blk = row * (k / BLOCK) + b;
    let dm = block_dm(blk);
    let m = q5k_quarter(blk, q);
    return mat2x4<f32>(dm.x * m[0] + dm.y, dm.x * m[1] + dm.y);
}
