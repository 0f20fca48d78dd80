// matvec_q8.wgsl's activations made by the matvec itself: the RMSNorm of the residual row by the
// norm's weights, the values rmsnorm.wgsl would have written, staged as 8-bit activations in
// workgroup memory (matvec_q8_x_staged.wgsl). A decode step's norm is one workgroup on the critical path
// between two matvecs; here every workgroup redoes it (a row of x and of the weights, from
// cache) and the step saves the norm's dispatch. One token a workgroup (TOKENS is 1);
// `MatmulOp::take_norm` in core builds it only then.

override NORM_EPS: f32;

// The residual rows (p.x_stride floats apart) and the norm's weights.
@group(0) @binding(2) var<storage, read> x_rows: array<f32>;
@group(0) @binding(6) var<storage, read> norm_g: array<f32>;

fn x_row4(at: u32) -> vec4<f32> {
    return vec4<f32>(x_rows[at], x_rows[at + 1u], x_rows[at + 2u], x_rows[at + 3u]);
}

// Called by every lane, in uniform control flow: each lane holds runs of 4 values, as many
// passes over the row as it takes.
fn x_prepare(li: u32, t0: u32) {
    let k = p.k;
    let base = t0 * p.x_stride;
    var sum = 0.0;
    for (var c = 4u * li; c < k; c += 4u * WG) {
        let v = x_row4(base + c);
        sum += dot(v, v);
    }
    let inv = inverseSqrt(sum_lanes(li, sum) / f32(k) + NORM_EPS);
    for (var w0 = 0u; 4u * w0 < k; w0 += WG) {
        let w = w0 + li;
        let c = 4u * w;
        var v = vec4<f32>(0.0);
        if (c < k) {
            v = x_row4(base + c) * inv * vec4<f32>(norm_g[c], norm_g[c + 1u], norm_g[c + 2u], norm_g[c + 3u]);
        }
        x_stage(li, w, k, v);
    }
    workgroupBarrier();
}
