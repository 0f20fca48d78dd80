// Q6_K's and Q3_K's blocks of 32 (dequant_q6_k.wgsl): their six-bit values and their scales.
// `w` holds 6 words a block: 4 of low nibbles (word j: elements 8j..8j+3 in the low nibbles of
// its bytes, 8j+4..8j+7 in the high ones), then 2 of the values' top two bits (16 a word, in
// order). `s` holds, per super-block of 8 blocks, 5 words: its f16 d (the low half of the first),
// then its 16 signed 8-bit scales (Q3_K's 6-bit ones less 32), as the file holds them. The
// scales are formed as ggml forms them, in f32: d * sc, so the values are the file's exactly.
@group(0) @binding(3) var<storage, read> w: array<u32>;

// Elements 4g..4g+3 of block blk as their 6-bit values, one a byte.
fn q6k_group(blk: u32, g: u32) -> u32 {
    let lo = (w[blk * 6u + g / 2u] >> (4u * (g % 2u))) & 0x0f0f0f0fu;
    let t = (w[blk * 6u + 4u + g / 4u] >> (8u * (g % 4u))) & 0xffu;
    let hi = (t & 0x3u) | ((t & 0xcu) << 6u) | ((t & 0x30u) << 12u) | ((t & 0xc0u) << 18u);
    return lo | (hi << 4u);
}

// The block's two scales, one a half of 16 values.
fn q6k_scales(blk: u32) -> vec2<f32> {
    let at = 5u * (blk / 8u);
    let j = blk % 8u;
    let d = unpack2x16float(s[at]).x;
    let word = bitcast<i32>(s[at + 1u + j / 2u]);
    let shift = 16u * (j % 2u);
    return d * vec2<f32>(f32(extractBits(word, shift, 8u)), f32(extractBits(word, shift + 8u, 8u)));
}
