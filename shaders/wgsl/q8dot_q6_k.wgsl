// Q6_K and Q3_K weights (dequant_q6_k.wgsl's layout: 32 six-bit values v = q + 32, a scale per 16)
// against a block of 8-bit activations: the values as bytes (below 64, so the signed byte dot
// reads them as they are), less 32 times each half's activation sum, each half under its scale.

struct WeightBlock {
    q0: vec4<u32>,
    q1: vec4<u32>,
    d: vec2<f32>,
}

fn q8_weights(row: u32, b: u32, nb: u32) -> WeightBlock {
    let blk = row * nb + b;
    return WeightBlock(
        vec4<u32>(q6k_group(blk, 0u), q6k_group(blk, 1u), q6k_group(blk, 2u), q6k_group(blk, 3u)),
        vec4<u32>(q6k_group(blk, 4u), q6k_group(blk, 5u), q6k_group(blk, 6u), q6k_group(blk, 7u)),
        q6k_scales(blk),
    );
}

fn q8_dot(wb: WeightBlock, x0: vec4<u32>, x1: vec4<u32>, xds: vec2<f32>) -> f32 {
    let ones = vec4<u32>(0x01010101u);
    let a = dot_i8x16(wb.q0, x0) - 32 * dot_i8x16(ones, x0);
    let b = dot_i8x16(wb.q1, x1) - 32 * dot_i8x16(ones, x1);
    return xds.x * (wb.d.x * f32(a) + wb.d.y * f32(b));
}
