// Q6_K and Q3_K weights (dequant_q6_k.wgsl's layout: 32 signed bytes, a scale per 16)
// against a block of 8-bit activations: byte for byte, each half under its own scale.
@group(0) @binding(3) var<storage, read> w: array<vec4<u32>>;

struct WeightBlock {
    q0: vec4<u32>,
    q1: vec4<u32>,
    d: vec2<f32>,
}

fn q8_weights(row: u32, b: u32, nb: u32) -> WeightBlock {
    let blk = row * nb + b;
    return WeightBlock(w[2u * blk], w[2u * blk + 1u], q6k_scales(blk));
}

fn q8_dot(wb: WeightBlock, x0: vec4<u32>, x1: vec4<u32>, xds: vec2<f32>) -> f32 {
    return xds.x * (wb.d.x * f32(dot_i8x16(wb.q0, x0)) + wb.d.y * f32(dot_i8x16(wb.q1, x1)));
}
