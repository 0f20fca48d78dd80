// RMSNorm: out[r] = x[src] * g / sqrt(mean(x[src]^2) + eps), one workgroup per row.
// With GATHER the source row is taken from `rows` (the tokens that get logits), so the final norm
// also compacts the rows the output head runs on. With Q8 (DIM a multiple of 32), decode steps
// also get the output as 8-bit activations for matvec_q8.wgsl (`q8_words`, common.wgsl).

override DIM: u32;
override EPS: f32;
override GATHER: bool = false;
override Q8: bool = false;

// Wide enough that one row is a few loads per lane: a decode step has one row per sequence.
const WG: u32 = 256u;

@group(0) @binding(0) var<uniform> step: Step;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> g: array<f32>;
@group(0) @binding(3) var<storage, read> rows: array<u32>;
@group(0) @binding(4) var<storage, read_write> out: array<f32>;
@group(0) @binding(5) var<storage, read_write> out_q8: array<u32>;

var<workgroup> red: array<f32, WG>;

@compute @workgroup_size(WG)
fn main(@builtin(local_invocation_index) lane: u32, @builtin(workgroup_id) wg: vec3<u32>) {
    let r = wg.x;
    var n_rows = step.n_tokens;
    if (GATHER) {
        n_rows = step.n_sample;
    }
    // `r` is uniform across the workgroup, so returning here keeps barriers uniform.
    if (r >= n_rows) {
        return;
    }
    var src = r;
    if (GATHER) {
        src = rows[r];
    }
    let base = src * DIM;
    var sum = 0.0;
    for (var i = lane; i < DIM; i += WG) {
        let v = x[base + i];
        sum += v * v;
    }
    red[lane] = sum;
    workgroupBarrier();
    for (var stride = WG / 2u; stride > 0u; stride >>= 1u) {
        if (lane < stride) {
            red[lane] += red[lane + stride];
        }
        workgroupBarrier();
    }
    let inv = inverseSqrt(red[0] / f32(DIM) + EPS);
    if (!(Q8 && n_rows <= Q8_TOKENS)) {
        for (var i = lane; i < DIM; i += WG) {
            out[r * DIM + i] = x[base + i] * inv * g[i];
        }
        return;
    }
    // A lane 4 consecutive values, quantized together with their neighbours (q8_lanes.wgsl).
    for (var w0 = 0u; w0 < DIM / 4u; w0 += WG) {
        let w = w0 + lane;
        var v = vec4<f32>(0.0);
        if (w < DIM / 4u) {
            let c = 4u * w;
            v = vec4<f32>(x[base + c], x[base + c + 1u], x[base + c + 2u], x[base + c + 3u]) * inv
                * vec4<f32>(g[c], g[c + 1u], g[c + 2u], g[c + 3u]);
            for (var i = 0u; i < 4u; i++) {
                out[r * DIM + c + i] = v[i];
            }
        }
        let q = q8_lanes(lane, v);
        if (w < DIM / 4u) {
            q8_store_word(DIM, r, w, q);
        }
    }
}
