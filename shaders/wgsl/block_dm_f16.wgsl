// A block's scale and minimum (d, m) as one f16 pair a word in `s` (Q4_1's own).
fn block_dm(blk: u32) -> vec2<f32> {
    return unpack2x16float(s[blk]);
}
