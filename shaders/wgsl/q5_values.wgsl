// The five-bit formats' blocks of 32 (Q5_0, Q5_1, Q5_K: dequant_q5.wgsl, q8dot_q5.wgsl): their
// values 0..31 in 5 words a block in `w`: 4 of low nibbles (word j: elements 8j..8j+3 in the low
// nibbles of its bytes, 8j+4..8j+7 in the high ones), then one of the values' top bits (element
// i at bit i). 5 bits a value, as the files hold them.
@group(0) @binding(3) var<storage, read> w: array<u32>;

// Elements 4g..4g+3 of block blk as their 5-bit values, one a byte.
fn q5_group(blk: u32, g: u32) -> u32 {
    let lo = (w[blk * 5u + g / 2u] >> (4u * (g % 2u))) & 0x0f0f0f0fu;
    let t = (w[blk * 5u + 4u] >> (4u * g)) & 0xfu;
    let hi = (t & 0x1u) | ((t & 0x2u) << 7u) | ((t & 0x4u) << 14u) | ((t & 0x8u) << 21u);
    return lo | (hi << 4u);
}
