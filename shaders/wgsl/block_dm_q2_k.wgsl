// A block's two (scale, minimum) pairs, one a half of 16 values, for Q2_K's blocks of 32, from
// their super-block's own scales as the file holds them: per super-block of 8 blocks, 5 words in
// `s`: its f16 d and dmin as one pair, then the 16 bytes of 4-bit scales (low nibble) and
// minimums (high nibble). Formed as ggml forms them, in f32: d * sc and -(dmin * m), so the
// values are the file's exactly. Returns (scale, minimum) of the first half, then of the second.
fn q2k_dm(blk: u32) -> vec4<f32> {
    let at = 5u * (blk / 8u);
    let j = blk % 8u;
    let dd = unpack2x16float(s[at]);
    let pair = s[at + 1u + j / 2u] >> (16u * (j % 2u));
    let sc = vec2<u32>(pair & 0xffu, (pair >> 8u) & 0xffu);
    return vec4<f32>(dd.x * f32(sc.x & 0xfu), -(dd.y * f32(sc.x >> 4u)), dd.x * f32(sc.y & 0xfu), -(dd.y * f32(sc.y >> 4u)));
}
