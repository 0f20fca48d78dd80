// Q5_K and Q5_1 weights (dequant_q5_k.wgsl's layout: 32 bytes of 0..31 a block, its scale and
// minimum by `block_dm`) against a block of 8-bit activations: the bytes are below 128, so the signed
// byte dot reads them as they are. x = d * q + m, so m takes s.
@group(0) @binding(3) var<storage, read> w: array<vec4<u32>>;

struct WeightBlock {
    q0: vec4<u32>,
    q1: vec4<u32>,
    dm: vec2<f32>,
}

fn q8_weights(row: u32, b: u32, nb: u32) -> WeightBlock {
    let blk = row * nb + b;
    return WeightBlock(w[2u * blk], w[2u * blk + 1u], block_dm(blk));
}

fn q8_dot(wb: WeightBlock, x0: vec4<u32>, x1: vec4<u32>, xds: vec2<f32>) -> f32 {
    return wb.dm.x * xds.x * f32(dot_i8x16(wb.q0, x0) + dot_i8x16(wb.q1, x1)) + wb.dm.y * xds.y;
}
