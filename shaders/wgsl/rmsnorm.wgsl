// RMSNorm: out[r] = x[src] * g / sqrt(mean(x[src]^2) + eps), one workgroup per row.
// With GATHER the source row is taken from `rows` (the tokens that get logits), so the final norm
// also compacts the rows the output head runs on. With Q8 (DIM a multiple of 32), decode steps
// also get the output as 8-bit activations for matvec_q8.wgsl (q8_lanes.wgsl), and the row is
// read once into registers: a decode step's norm is one workgroup on the critical path, so each
// round trip to memory shows.

override DIM: u32;
override EPS: f32;
override GATHER: bool = false;
override Q8: bool = false;
// Adds the normed row into `out` instead of writing it: the norms that follow a block's output
// before the residual sum (Gemma's post-attention and post-feed-forward norms).
override ADD: bool = false;

// Wide enough that one row is a few loads per lane: a decode step has one row per sequence.
const WG: u32 = 256u;
// Runs of 4 values a lane keeps in registers on the 8-bit path (rows up to 8192 wide).
const MAX_WORDS: u32 = 8u;

@group(0) @binding(0) var<uniform> step: Step;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> g: array<f32>;
@group(0) @binding(3) var<storage, read> rows: array<u32>;
@group(0) @binding(4) var<storage, read_write> out: array<f32>;
@group(0) @binding(5) var<storage, read_write> out_q8: array<u32>;

// `sum_lanes(lane, v)`, the sum of every lane's `v` in a fixed order, comes from
// norm_lanes_subgroup.wgsl (32-lane subgroups) or norm_lanes_workgroup.wgsl.

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
    if (Q8 && !ADD && n_rows <= Q8_TOKENS) {
        norm_q8(lane, r, base);
        return;
    }
    var sum = 0.0;
    for (var i = lane; i < DIM; i += WG) {
        let v = x[base + i];
        sum += v * v;
    }
    let inv = inverseSqrt(sum_lanes(lane, sum) / f32(DIM) + EPS);
    for (var i = lane; i < DIM; i += WG) {
        let y = x[base + i] * inv * g[i];
        if (ADD) {
            out[r * DIM + i] += y;
        } else {
            out[r * DIM + i] = y;
        }
    }
}

// Lane i holds values 4w..4w+3 for w = i, i + WG, ... (with g), then writes them scaled, as f32
// and quantized together with their block's 7 other lanes. Rows longer than 4 * WG * MAX_WORDS
// read their remaining values again for the second pass.
fn norm_q8(lane: u32, r: u32, base: u32) {
    var xs: array<vec4<f32>, MAX_WORDS>;
    var gs: array<vec4<f32>, MAX_WORDS>;
    var sum = 0.0;
    for (var i = 0u; 4u * i * WG < DIM; i++) {
        let c = 4u * (lane + i * WG);
        if (c < DIM) {
            let v = load4(base, c);
            sum += dot(v, v);
            if (i < MAX_WORDS) {
                xs[i] = v;
                gs[i] = vec4<f32>(g[c], g[c + 1u], g[c + 2u], g[c + 3u]);
            }
        }
    }
    let inv = inverseSqrt(sum_lanes(lane, sum) / f32(DIM) + EPS);
    // Uniform trip count: whole passes past the row are skipped by every lane alike.
    for (var i = 0u; 4u * i * WG < DIM; i++) {
        let w = lane + i * WG;
        let c = 4u * w;
        var v = vec4<f32>(0.0);
        if (c < DIM) {
            if (i < MAX_WORDS) {
                v = xs[i] * inv * gs[i];
            } else {
                v = load4(base, c) * inv * vec4<f32>(g[c], g[c + 1u], g[c + 2u], g[c + 3u]);
            }
            for (var k = 0u; k < 4u; k++) {
                out[r * DIM + c + k] = v[k];
            }
        }
        let q = q8_lanes(lane, v);
        if (c < DIM) {
            q8_store_word(DIM, r, w, q);
        }
    }
}

fn load4(base: u32, c: u32) -> vec4<f32> {
    return vec4<f32>(x[base + c], x[base + c + 1u], x[base + c + 2u], x[base + c + 3u]);
}
