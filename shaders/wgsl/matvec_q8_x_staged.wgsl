// The workgroup-memory row of 8-bit activations that matvec_q8.wgsl's twins make themselves
// (matvec_q8_x_norm.wgsl, matvec_q8_x_merge.wgsl): their `x_prepare` computes a lane's run of 4
// values and stages it here (`x_stage`), and `x_block` reads the blocks back. One token a
// workgroup, rows of whole blocks up to MAX_X_BLOCKS long.

const MAX_X_BLOCKS: u32 = 256u;

var<workgroup> x_words: array<u32, MAX_X_BLOCKS * 8u>;
var<workgroup> x_ds: array<vec2<f32>, MAX_X_BLOCKS>;

// Quantizes lane li's run v of columns 4w.. of a row k wide (q8_lanes.wgsl: lanes 8j..8j+7 a
// block, so every lane calls it, in uniform control flow, with zeros past the row) into the row.
fn x_stage(li: u32, w: u32, k: u32, v: vec4<f32>) {
    let q = q8_lanes(li, v);
    if (4u * w < k) {
        x_words[w] = q.word;
        if (w % 8u == 0u) {
            x_ds[w / 8u] = vec2<f32>(q.d, q.s);
        }
    }
}

fn x_block(t: u32, b: u32, xbs: u32) -> XBlock {
    let w = 8u * b;
    return XBlock(
        vec4<u32>(x_words[w], x_words[w + 1u], x_words[w + 2u], x_words[w + 3u]),
        vec4<u32>(x_words[w + 4u], x_words[w + 5u], x_words[w + 6u], x_words[w + 7u]),
        x_ds[b],
    );
}
