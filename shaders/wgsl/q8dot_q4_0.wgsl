// Q4_0 weights (dequant_q4_0.wgsl's layout: 4 quant words a block, f16 scales two a word) against
// a block of 8-bit activations: word i's low nibbles are elements 4i..4i+3 and its high nibbles
// 16+4i..16+4i+3, the activations' words i and 4 + i. x = d * (q - 8), so the -8 comes from s.
@group(0) @binding(3) var<storage, read> w: array<vec4<u32>>;

struct WeightBlock {
    q: vec4<u32>,
    d: f32,
}

fn q8_weights(row: u32, b: u32, nb: u32) -> WeightBlock {
    let blk = row * nb + b;
    return WeightBlock(w[blk], unpack2x16float(s[blk >> 1u])[blk & 1u]);
}

fn q8_dot(wb: WeightBlock, x0: vec4<u32>, x1: vec4<u32>, xds: vec2<f32>) -> f32 {
    return wb.d * (xds.x * f32(dot_nibbles_i8(wb.q, x0, x1)) - 8.0 * xds.y);
}
