// A block's two scales (one a half of 16 values) for Q6_K's and Q3_K's blocks of 32, from their
// super-block's own scales as the file holds them: per super-block of 8 blocks, 5 words in `s`:
// its f16 d (the low half of the first), then the 16 signed 8-bit scales (Q3_K's 6-bit ones less
// 32). Formed as ggml forms them, in f32: d * sc, so the values are the file's exactly.
fn q6k_scales(blk: u32) -> vec2<f32> {
    let at = 5u * (blk / 8u);
    let j = blk % 8u;
    let d = unpack2x16float(s[at]).x;
    let word = bitcast<i32>(s[at + 1u + j / 2u]);
    let shift = 16u * (j % 2u);
    return d * vec2<f32>(f32(extractBits(word, shift, 8u)), f32(extractBits(word, shift + 8u, 8u)));
}
