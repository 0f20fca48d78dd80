// F16 weights read as WGSL `f16` (SHADER_F16 adapters): the same layout and summation order as
// dequant_f16.wgsl, with the halves converted by the load instead of unpack2x16float.
@group(0) @binding(3) var<storage, read> w: array<f16>;
const BLOCK: u32 = 32u;

fn dq_elem(row: u32, col: u32, k: u32) -> f32 {
    return f32(w[row * k + col]);
}

fn block_dot(row: u32, b: u32, k: u32, xo: u32) -> f32 {
    let base = b * BLOCK;
    let e = row * k + base;
    var sum = 0.0;
    if (k % 4u == 0u && base + BLOCK <= k) {
        for (var i = 0u; i < BLOCK; i += 4u) {
            let h = e + i;
            let v = vec4<f32>(vec4<f16>(w[h], w[h + 1u], w[h + 2u], w[h + 3u]));
            sum += dot(v, x4(xo + i));
        }
        return sum;
    }
    for (var i = 0u; i < min(BLOCK, k - base); i++) {
        sum += dq_elem(row, base + i, k) * x[xo + i];
    }
    return sum;
}
