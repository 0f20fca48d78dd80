// A Q5_0 block's scale and minimum (d, m): its f16 d, one a half word in `s` as the file holds
// it, and -16 d, so d * v + m is ggml's (v - 16) * d exactly (both products are exact in f32).
fn block_dm(blk: u32) -> vec2<f32> {
    let d = unpack2x16float(s[blk >> 1u])[blk & 1u];
    return vec2<f32>(d, -16.0 * d);
}
