// Q5_0, Q5_1 and Q5_K weights (dequant_q5.wgsl's layout: 32 values 0..31 a block, its scale and
// minimum by `block_dm`) against a block of 8-bit activations: the values spread to bytes (below
// 128, so the signed byte dot reads them as they are). x = d * v + m, so m takes s.

struct WeightBlock {
    q0: vec4<u32>,
    q1: vec4<u32>,
    dm: vec2<f32>,
}

fn q8_weights(row: u32, b: u32, nb: u32) -> WeightBlock {
    let blk = row * nb + b;
    return WeightBlock(
        vec4<u32>(q5_group(blk, 0u), q5_group(blk, 1u), q5_group(blk, 2u), q5_group(blk, 3u)),
        vec4<u32>(q5_group(blk, 4u), q5_group(blk, 5u), q5_group(blk, 6u), q5_group(blk, 7u)),
        block_dm(blk),
    );
}

fn q8_dot(wb: WeightBlock, x0: vec4<u32>, x1: vec4<u32>, xds: vec2<f32>) -> f32 {
    return wb.dm.x * xds.x * f32(dot_i8x16(wb.q0, x0) + dot_i8x16(wb.q1, x1)) + wb.dm.y * xds.y;
}
