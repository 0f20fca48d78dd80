// A block's scale and minimum (d, m) for Q4_K's and Q5_K's blocks of 32, from their super-block's
// own scales as the file holds them: per super-block of 8 blocks, 5 words in `s`: its f16 d and
// dmin as one pair, then each block's 6-bit scale and minimum as a byte pair (2.5 bytes a block
// where f32 pairs took 8). Formed as ggml forms them, in f32: d * sc and -(dmin * m), so the
// values are the file's exactly.
fn block_dm(blk: u32) -> vec2<f32> {
    let at = 5u * (blk / 8u);
    let j = blk % 8u;
    let dd = unpack2x16float(s[at]);
    let pair = (s[at + 1u + j / 2u] >> (16u * (j % 2u))) & 0xffffu;
    return vec2<f32>(dd.x * f32(pair & 0xffu), -(dd.y * f32(pair >> 8u)));
}
