// Q2_K weights (dequant_q2_k.wgsl's layout: 16 two-bit values a word, a scale and minimum per 16)
// against a block of 8-bit activations: each word spread to 16 bytes for the signed byte dot, and
// each half's minimum times the sum of its activations.
@group(0) @binding(3) var<storage, read> w: array<vec2<u32>>;

struct WeightBlock {
    q: vec2<u32>,
    dm: vec4<f32>,
}

fn q8_weights(row: u32, b: u32, nb: u32) -> WeightBlock {
    let blk = row * nb + b;
    return WeightBlock(w[blk], q2k_dm(blk));
}

// 16 two-bit values as 16 bytes, in order.
fn spread_2bit(word: u32) -> vec4<u32> {
    let t = vec4<u32>(word) >> vec4<u32>(0u, 8u, 16u, 24u);
    return (t & vec4<u32>(0x3u)) | ((t & vec4<u32>(0xcu)) << vec4<u32>(6u)) | ((t & vec4<u32>(0x30u)) << vec4<u32>(12u))
        | ((t & vec4<u32>(0xc0u)) << vec4<u32>(18u));
}

fn q8_dot(wb: WeightBlock, x0: vec4<u32>, x1: vec4<u32>, xds: vec2<f32>) -> f32 {
    let ones = vec4<u32>(0x01010101u);
    let q = wb.dm.x * f32(dot_i8x16(spread_2bit(wb.q.x), x0)) + wb.dm.z * f32(dot_i8x16(spread_2bit(wb.q.y), x1));
    let m = wb.dm.y * f32(dot_i8x16(ones, x0)) + wb.dm.w * f32(dot_i8x16(ones, x1));
    return xds.x * (q + m);
}
