// Where a producer's 8-bit activations go (common.wgsl's layout), for the kernels that bind
// `out_q8`.

// Writes lane word `w` (4 values from 4w) of token t's activations, `stride` floats wide.
fn q8_store_word(stride: u32, t: u32, w: u32, q: Q8Word) {
    let b = w / 8u;
    out_q8[q8_index(stride, t, b, w % 8u)] = q.word;
    if (w % 8u == 0u) {
        out_q8[q8_index(stride, t, b, 8u)] = bitcast<u32>(q.d);
        out_q8[q8_index(stride, t, b, 9u)] = bitcast<u32>(q.s);
    }
}
