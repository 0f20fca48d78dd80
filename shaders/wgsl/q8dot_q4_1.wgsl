// Q4_1 and Q4_K weights (dequant_q4_1.wgsl's layout: 4 quant words a block, (d, m) by `block_dm`)
// against a block of 8-bit activations, nibbles placed as in Q4_0. x = d * q + m, so m takes s.
@group(0) @binding(3) var<storage, read> w: array<vec4<u32>>;

struct WeightBlock {
    q: vec4<u32>,
    dm: vec2<f32>,
}

fn q8_weights(row: u32, b: u32, nb: u32) -> WeightBlock {
    let blk = row * nb + b;
    return WeightBlock(w[blk], block_dm(blk));
}

fn q8_dot(wb: WeightBlock, x0: vec4<u32>, x1: vec4<u32>, xds: vec2<f32>) -> f32 {
    return wb.dm.x * xds.x * f32(dot_nibbles_i8(wb.q, x0, x1)) + wb.dm.y * xds.y;
}
