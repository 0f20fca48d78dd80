// matvec_q8.wgsl's activations made by the matvec itself: the RMSNorm of the residual row by the
// norm's weights, quantized to 8 bits (q8_lanes.wgsl) into workgroup memory, the values
// rmsnorm.wgsl would have written. A decode step's norm is one workgroup on the critical path
// between two matvecs; here every workgroup redoes it (a row of x and of the weights, from
// cache) and the step saves the norm's dispatch. One token a workgroup (TOKENS is 1), rows of
// whole blocks up to MAX_X_BLOCKS long; `MatmulOp::take_norm` in core builds it only then.

override NORM_EPS: f32;
const MAX_X_BLOCKS: u32 = 256u;

// The residual rows (p.x_stride floats apart) and the norm's weights.
@group(0) @binding(2) var<storage, read> x_rows: array<f32>;
@group(0) @binding(6) var<storage, read> norm_g: array<f32>;

var<workgroup> x_words: array<u32, MAX_X_BLOCKS * 8u>;
var<workgroup> x_ds: array<vec2<f32>, MAX_X_BLOCKS>;

struct XBlock {
    lo: vec4<u32>,
    hi: vec4<u32>,
    ds: vec2<f32>,
}

fn x_row4(at: u32) -> vec4<f32> {
    return vec4<f32>(x_rows[at], x_rows[at + 1u], x_rows[at + 2u], x_rows[at + 3u]);
}

// Called by every lane, in uniform control flow: each lane holds runs of 4 values, lanes
// 8k..8k+7 a block (q8_lanes' contract), as many passes over the row as it takes.
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
        let q = q8_lanes(li, v);
        if (c < k) {
            x_words[w] = q.word;
            if (w % 8u == 0u) {
                x_ds[w / 8u] = vec2<f32>(q.d, q.s);
            }
        }
    }
    workgroupBarrier();
}

fn x_block(t: u32, b: u32, xbs: u32) -> XBlock {
    let w = 8u * b;
    return XBlock(
        vec4<u32>(x_words[w], x_words[w + 1u], x_words[w + 2u], x_words[w + 3u]),
        vec4<u32>(x_words[w + 4u], x_words[w + 5u], x_words[w + 6u], x_words[w + 7u]),
        x_ds[b],
    );
}
