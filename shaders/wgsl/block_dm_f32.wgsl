// A block's scale and minimum (d, m) as two f32 words in `s` (Q4_K's and Q5_K's transcoded
// blocks, whose d * sc and dmin * m are formed in f32 at upload).
fn block_dm(blk: u32) -> vec2<f32> {
    return vec2<f32>(bitcast<f32>(s[2u * blk]), bitcast<f32>(s[2u * blk + 1u]));
}
