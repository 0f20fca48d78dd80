// Combines attention.wgsl's per-chunk softmax states of each (head, token), in chunk order:
// out = sum_c exp(m_c - M) acc_c / sum_c exp(m_c - M) l_c.

override N_HEADS: u32;
override HEAD_DIM: u32;
override CHUNK: u32;

const WG: u32 = 32u;

@group(0) @binding(0) var<uniform> step: Step;
@group(0) @binding(1) var<storage, read> tokens: array<TokenInfo>;
@group(0) @binding(2) var<storage, read> partials: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

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
    for (var d = lane; d < HEAD_DIM; d += WG) {
        var sum = 0.0;
        for (var c = 0u; c < chunks; c++) {
            sum += partials[base + c * stride + 2u + d] * exp(partials[base + c * stride] - big);
        }
        out[(t * N_HEADS + h) * HEAD_DIM + d] = sum / total;
    }
}
