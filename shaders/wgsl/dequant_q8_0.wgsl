// Q8_0 (GGUF): blocks of 32 signed bytes with one f16 scale, x = d * q.
// Repacked at upload into 8 quant words per block (`w`) and the f16 scales two per word (`s`),
// so every load is an aligned u32; the bytes themselves are the file's.
const BLOCK: u32 = 32u;

fn q8_scale(blk: u32) -> f32 {
    return unpack2x16float(s[blk >> 1u])[blk & 1u];
}

fn dq_elem(row: u32, col: u32, k: u32) -> f32 {
    let blk = row * (k / BLOCK) + col / BLOCK;
    let i = col % BLOCK;
    let word = w[blk * 8u + i / 4u];
    let q = extractBits(bitcast<i32>(word), (i % 4u) * 8u, 8u);
    return q8_scale(blk) * f32(q);
}

fn dq_block(row: u32, b: u32, k: u32) -> array<f32, 32> {
    var out: array<f32, 32>;
    let blk = row * (k / BLOCK) + b;
    let d = q8_scale(blk);
    for (var j = 0u; j < 8u; j++) {
        let word = bitcast<i32>(w[blk * 8u + j]);
        for (var c = 0u; c < 4u; c++) {
            out[j * 4u + c] = d * f32(extractBits(word, c * 8u, 8u));
        }
    }
    return out;
}
