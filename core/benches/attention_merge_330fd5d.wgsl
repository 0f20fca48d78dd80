// Combines attention.wgsl's per-chunk softmax states of each (head, token), in chunk order:
// out = sum_c exp(m_c - M) acc_c / sum_c exp(m_c - M) l_c. With Q8 (HEAD_DIM a multiple of 32),
// decode steps also get `out` as 8-bit activations for matvec_q8.wgsl.

override N_HEADS: u32;
override HEAD_DIM: u32;
override CHUNK: u32;
override Q8: bool = false;

const WG: u32 = 32u;

@group(0) @binding(0) var<uniform> step: Step;
@group(0) @binding(1) var<storage, read> tokens: array<TokenInfo>;
@group(0) @binding(2) var<storage, read> partials: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;
@group(0) @binding(4) var<storage, read_write> out_q8: array<u32>;

@compute @workgroup_size(WG)
fn main(@builtin(local_invocation_index) lane: u32, @builtin(workgroup_id) wg: vec3<u32>) {
    let h = wg.x;
    let t = wg.y;
    if (t >= step.n_tokens) {
        return;
    }
    let chunks = (tokens[t].pos + CHUNK) / CHUNK;
    let stride = N_HEADS * (HEAD_DIM + 2u);
    let base = (tokens[t].chunk_off * N_HEADS + h) * (HEAD_DIM + 2u);
    var big = -3.0e38;
    for (var c = 0u; c < chunks; c++) {
        big = max(big, partials[base + c * stride]);
    }
    var total = 0.0;
    for (var c = 0u; c < chunks; c++) {
        total += partials[base + c * stride + 1u] * exp(partials[base + c * stride] - big);
    }
    let q8 = Q8 && step.n_tokens <= Q8_TOKENS;
    // A lane 4 consecutive dimensions, a trip 4 * WG of them.
    for (var d0 = 0u; d0 < HEAD_DIM; d0 += 4u * WG) {
        let d = d0 + 4u * lane;
        var v = vec4<f32>(0.0);
        for (var i = 0u; i < 4u; i++) {
            if (d + i < HEAD_DIM) {
                var sum = 0.0;
                for (var c = 0u; c < chunks; c++) {
                    sum += partials[base + c * stride + 2u + d + i] * exp(partials[base + c * stride] - big);
                }
                v[i] = sum / total;
                out[(t * N_HEADS + h) * HEAD_DIM + d + i] = v[i];
            }
        }
        if (q8) {
            let q = q8_lanes(lane, v);
            if (d < HEAD_DIM) {
                q8_store_word(N_HEADS * HEAD_DIM, t, (h * HEAD_DIM + d) / 4u, q);
            }
        }
    }
}
