// Prototype, for the kernel bench only: the decode matvec with activations quantized to 8 bits
// (one f32 scale and one f32 sum per block of 32, as llama.cpp's q8_1) and Q4_0 weights, dot
// products on packed bytes (`dot4I8Packed`). A lane takes whole blocks: one 16-byte load of
// quants and two of activations, 8 packed dot products. One token, 32-lane subgroups.
// The activation buffer: k bytes of quants, then nb scales, then nb sums (f32).

struct MatmulParams {
    n: u32,
    k: u32,
    y_stride: u32,
    x_stride: u32,
    y_offset: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> step: Step;
@group(0) @binding(1) var<uniform> p: MatmulParams;
@group(0) @binding(2) var<storage, read> xq: array<vec4<u32>>;
@group(0) @binding(3) var<storage, read> wq: array<vec4<u32>>;
@group(0) @binding(4) var<storage, read> s: array<u32>;
@group(0) @binding(5) var<storage, read_write> y: array<f32>;
@group(0) @binding(6) var<storage, read> xs: array<f32>;

override UNROLL: u32 = 4u;
override WG: u32 = 64u;

@compute @workgroup_size(WG)
fn main(@builtin(local_invocation_index) li: u32, @builtin(workgroup_id) wg: vec3<u32>) {
    let lane = li % 32u;
    let row = wg.x * (WG / 32u) + li / 32u;
    let r = min(row, p.n - 1u);
    let nb = p.k / 32u;
    let scales = p.k / 4u;
    var acc = 0.0;
    for (var b0 = lane; b0 < nb; b0 += 32u * UNROLL) {
        for (var u = 0u; u < UNROLL; u++) {
            let b = b0 + u * 32u;
            let bb = min(b, nb - 1u);
            let blk = r * nb + bb;
            let wv = wq[blk];
            let x0 = xq[bb * 2u];
            let x1 = xq[bb * 2u + 1u];
            let dw = unpack2x16float(s[blk >> 1u])[blk & 1u];
            let m = vec4<u32>(0x0f0f0f0fu);
            let lo = wv & m;
            let hi = (wv >> vec4<u32>(4u)) & m;
            let sum = dot4I8Packed(lo.x, x0.x) + dot4I8Packed(lo.y, x0.y) + dot4I8Packed(lo.z, x0.z) + dot4I8Packed(lo.w, x0.w)
                + dot4I8Packed(hi.x, x1.x) + dot4I8Packed(hi.y, x1.y) + dot4I8Packed(hi.z, x1.z) + dot4I8Packed(hi.w, x1.w);
            acc += select(0.0, dw * (xs[scales + bb] * f32(sum) - 8.0 * xs[scales + nb + bb]), b < nb);
        }
    }
    acc = subgroupAdd(acc);
    if (lane == 0u && row < p.n) {
        y[p.y_offset + row] = acc;
    }
}
