// matvec_q8.wgsl's activations as the kernel that produced them wrote them (q8_lanes.wgsl):
// token t's block b has its quants at xq[2 * (t * x_stride / 32 + b)] and the next, its (d, s)
// at xd[t * x_stride / 32 + b] (the two ranges of one buffer, bound apart).

@group(0) @binding(2) var<storage, read> xq: array<vec4<u32>>;
@group(0) @binding(6) var<storage, read> xd: array<vec2<f32>>;

fn x_prepare(li: u32, t0: u32) {}

fn x_block(t: u32, b: u32, xbs: u32) -> XBlock {
    let o = t * xbs + b;
    return XBlock(xq[2u * o], xq[2u * o + 1u], xd[o]);
}
