// Q4_0 (GGUF): blocks of 32 four-bit values with one f16 scale, x = d * (q - 8).
// Byte j of a block holds element j in its low nibble and element j + 16 in its high nibble.
// Repacked at upload into 4 quant words per block (`w`) and the f16 scales two per word (`s`).
const BLOCK: u32 = 32u;

fn q4_0_scale(blk: u32) -> f32 {
    return unpack2x16float(s[blk >> 1u])[blk & 1u];
}

fn dq_elem(row: u32, col: u32, k: u32) -> f32 {
    let blk = row * (k / BLOCK) + col / BLOCK;
    let i = col % BLOCK;
    let j = i % 16u;
    let byte = (w[blk * 4u + j / 4u] >> ((j % 4u) * 8u)) & 0xffu;
    let q = select(byte & 0xfu, byte >> 4u, i >= 16u);
    return q4_0_scale(blk) * (f32(q) - 8.0);
}

fn dq_block(row: u32, b: u32, k: u32) -> array<f32, 32> {
    var out: array<f32, 32>;
    let blk = row * (k / BLOCK) + b;
    let d = q4_0_scale(blk);
    for (var j = 0u; j < 4u; j++) {
        let word = w[blk * 4u + j];
        for (var c = 0u; c < 4u; c++) {
            let byte = (word >> (c * 8u)) & 0xffu;
            out[j * 4u + c] = d * (f32(byte & 0xfu) - 8.0);
            out[j * 4u + c + 16u] = d * (f32(byte >> 4u) - 8.0);
        }
    }
    return out;
}
