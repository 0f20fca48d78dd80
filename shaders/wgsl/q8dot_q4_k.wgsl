// Q4_K weights (dequant_q4_k.wgsl's layout: Q4_1's nibbles, an f32 scale and minimum a block)
// against a block of 8-bit activations. x = d * q + m, so m takes s.
@group(0) @binding(3) var<storage, read> w: array<vec4<u32>>;

struct WeightBlock {
    q: vec4<u32>,
    dm: vec2<f32>,
}

fn q8_weights(row: u32, b: u32, nb: u32) -> WeightBlock {
    let blk = row * nb + b;
    return WeightBlock(w[blk], vec2<f32>(bitcast<f32>(s[2u * blk]), bitcast<f32>(s[2u * blk + 1u])));
}

fn q8_dot(wb: WeightBlock, x0: vec4<u32>, x1: vec4<u32>, xds: vec2<f32>) -> f32 {
    return wb.dm.x * xds.x * f32(dot_nibbles_i8(wb.q, x0, x1)) + wb.dm.y * xds.y;
}
