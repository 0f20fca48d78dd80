// Q4_1 (GGUF): blocks of 32 four-bit values with an f16 scale and an f16 minimum,
// x = d * q + m. Byte j holds element j (low nibble) and element j + 16 (high nibble).
// Repacked at upload into 4 quant words per block (`w`) and one word (d, m) per block (`s`).
const BLOCK: u32 = 32u;

fn dq_elem(row: u32, col: u32, k: u32) -> f32 {
    let blk = row * (k / BLOCK) + col / BLOCK;
    let i = col % BLOCK;
    let j = i % 16u;
    let byte = (w[blk * 4u + j / 4u] >> ((j % 4u) * 8u)) & 0xffu;
    let q = select(byte & 0xfu, byte >> 4u, i >= 16u);
    let dm = unpack2x16float(s[blk]);
    return dm.x * f32(q) + dm.y;
}

fn dq_block(row: u32, b: u32, k: u32) -> array<f32, 32> {
    var out: array<f32, 32>;
    let blk = row * (k / BLOCK) + b;
    let dm = unpack2x16float(s[blk]);
    for (var j = 0u; j < 4u; j++) {
        let word = w[blk * 4u + j];
        for (var c = 0u; c < 4u; c++) {
            let byte = (word >> (c * 8u)) & 0xffu;
            out[j * 4u + c] = dm.x * f32(byte & 0xfu) + dm.y;
            out[j * 4u + c + 16u] = dm.x * f32(byte >> 4u) + dm.y;
        }
    }
    return out;
}
