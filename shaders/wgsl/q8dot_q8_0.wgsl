// Q8_0 weights (dequant_q8_0.wgsl's layout: 8 quant words a block, the file's signed bytes in
// order; f16 scales two a word) against a block of 8-bit activations: byte for byte.
@group(0) @binding(3) var<storage, read> w: array<vec4<u32>>;

struct WeightBlock {
    q0: vec4<u32>,
    q1: vec4<u32>,
    d: f32,
}

fn q8_weights(row: u32, b: u32, nb: u32) -> WeightBlock {
    let blk = row * nb + b;
    return WeightBlock(w[2u * blk], w[2u * blk + 1u], unpack2x16float(s[blk >> 1u])[blk & 1u]);
}

fn q8_dot(wb: WeightBlock, x0: vec4<u32>, x1: vec4<u32>, xds: vec2<f32>) -> f32 {
    return wb.d * xds.x * f32(dot_i8x16(wb.q0, x0) + dot_i8x16(wb.q1, x1));
}
