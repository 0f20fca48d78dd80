// Q2_K (GGUF) on the GPU: super-blocks of 256 two-bit values, each 16 under its own scale and
// minimum, transcoded at upload into blocks of 32 values in order, 16 a word (2 quant words a
// block in `w`: element i at bits 2i of word i / 16), the scales kept as the file holds them
// (`q2k_dm`, block_dm_q2_k.wgsl): x = d * sc * q - dmin * m, exactly the file's values, in 2.6
// bits a weight as the file's.
@group(0) @binding(3) var<storage, read> w: array<u32>;
const BLOCK: u32 = 32u;

fn dq_elem(row: u32, col: u32, k: u32) -> f32 {
    let blk = row * (k / BLOCK) + col / BLOCK;
    let i = col % BLOCK;
    let q = (w[blk * 2u + i / 16u] >> (2u * (i % 16u))) & 3u;
    let dm = q2k_dm(blk);
    let h = 2u * (i / 16u);
    return dm[h] * f32(q) + dm[h + 1u];
}

fn block_dot(row: u32, b: u32, k: u32, xo: u32) -> f32 {
    let blk = row * (k / BLOCK) + b;
    let dm = q2k_dm(blk);
    var acc = 0.0;
    for (var h = 0u; h < 2u; h++) {
        let word = w[blk * 2u + h];
        var qx = 0.0;
        var sx = 0.0;
        for (var j = 0u; j < 4u; j++) {
            let q = (vec4<u32>(word >> (8u * j)) >> vec4<u32>(0u, 2u, 4u, 6u)) & vec4<u32>(3u);
            let x = x4(xo + 16u * h + 4u * j);
            qx += dot(vec4<f32>(q), x);
            sx += dot(x, vec4<f32>(1.0));
        }
        acc += dm[2u * h] * qx + dm[2u * h + 1u] * sx;
    }
    return acc;
}

// The matvec's quarter q of a block: elements 8q..8q+7, all in half q / 2 (half a word).
fn quarter_cols(q: u32) -> vec2<u32> {
    return vec2<u32>(8u * q, 8u * q + 4u);
}

fn q2k_quarter(blk: u32, q: u32) -> mat2x4<f32> {
    let t = vec4<u32>(w[blk * 2u + q / 2u] >> (16u * (q % 2u)));
    let qa = (t >> vec4<u32>(0u, 2u, 4u, 6u)) & vec4<u32>(3u);
    let qb = (t >> vec4<u32>(8u, 10u, 12u, 14u)) & vec4<u32>(3u);
    return mat2x4<f32>(vec4<f32>(qa), vec4<f32>(qb));
}

fn quarter_dot(row: u32, b: u32, k: u32, q: u32, xa: vec4<f32>, xb: vec4<f32>) -> f32 {
    let blk = row * (k / BLOCK) + b;
    let m = q2k_quarter(blk, q);
    let dm = q2k_dm(blk);
    let h = 2u * (q / 2u);
    return dm[h] * (dot(m[0], xa) + dot(m[1], xb)) + dm[h + 1u] * dot(xa + xb, vec4<f32>(1.0));
}

fn quarter_weights(row: u32, b: u32, k: u32, q: u32) -> mat2x4<f32> {
    let blk = row * (k / BLOCK) + b;
    let m = q2k_quarter(blk, q);
    let dm = q2k_dm(blk);
    let h = 2u * (q / 2u);
    return mat2x4<f32>(m[0] * dm[h] + dm[h + 1u], m[1] * dm[h] + dm[h + 1u]);
}
