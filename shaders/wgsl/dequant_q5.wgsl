// Q5_0, Q5_1 and Q5_K (GGUF) on the GPU: blocks of 32 values v in 0..31 (q5_values.wgsl: 5 bits a
// value, as the files hold them) under a scale and a minimum per block (`block_dm`: Q5_0's d and
// -16 d, block_dm_q5_0.wgsl; Q5_1's own f16 pair, block_dm_f16.wgsl; Q5_K's from its
// super-block's own scales, block_dm_k.wgsl): x = d * v + m, exactly the file's values.
const BLOCK: u32 = 32u;

// Four 5-bit values as floats.
fn group_f32(v: u32) -> vec4<f32> {
    return small_uints_to_f32((vec4<u32>(v) >> vec4<u32>(0u, 8u, 16u, 24u)) & vec4<u32>(0xffu), 0.0);
}

fn dq_elem(row: u32, col: u32, k: u32) -> f32 {
    let blk = row * (k / BLOCK) + col / BLOCK;
    let i = col % BLOCK;
    let v = (q5_group(blk, i / 4u) >> (8u * (i % 4u))) & 0xffu;
    let dm = block_dm(blk);
    return dm.x * f32(v) + dm.y;
}

fn block_dot(row: u32, b: u32, k: u32, xo: u32) -> f32 {
    let blk = row * (k / BLOCK) + b;
    var qx = 0.0;
    var sx = 0.0;
    for (var j = 0u; j < 8u; j++) {
        let x = x4(xo + j * 4u);
        qx += dot(group_f32(q5_group(blk, j)), x);
        sx += dot(x, vec4<f32>(1.0));
    }
    let dm = block_dm(blk);
    return dm.x * qx + dm.y * sx;
}

// The matvec's quarter q of a block: groups 2q and 2q + 1, elements 8q..8q+7.
fn quarter_cols(q: u32) -> vec2<u32> {
    return vec2<u32>(8u * q, 8u * q + 4u);
}

fn q5_quarter(blk: u32, q: u32) -> mat2x4<f32> {
    return mat2x4<f32>(group_f32(q5_group(blk, 2u * q)), group_f32(q5_group(blk, 2u * q + 1u)));
}

fn quarter_dot(row: u32, b: u32, k: u32, q: u32, xa: vec4<f32>, xb: vec4<f32>) -> f32 {
    let blk = row * (k / BLOCK) + b;
    let dm = block_dm(blk);
    let m = q5_quarter(blk, q);
    return dm.x * (dot(m[0], xa) + dot(m[1], xb)) + dm.y * dot(xa + xb, vec4<f32>(1.0));
}

fn quarter_weights(row: u32, b: u32, k: u32, q: u32) -> mat2x4<f32> {
    let blk = row * (k / BLOCK) + b;
    let dm = block_dm(blk);
    let m = q5_quarter(blk, q);
    return mat2x4<f32>(dm.x * m[0] + dm.y, dm.x * m[1] + dm.y);
}
