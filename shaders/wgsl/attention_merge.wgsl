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

var<workgroup> staged: array<f32, WG>;

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
    // Each trip is one block of 32 values (WG lanes), so the block is whole in `staged`.
    for (var d0 = 0u; d0 < HEAD_DIM; d0 += WG) {
        let d = d0 + lane;
        var v = 0.0;
        if (d < HEAD_DIM) {
            var sum = 0.0;
            for (var c = 0u; c < chunks; c++) {
                sum += partials[base + c * stride + 2u + d] * exp(partials[base + c * stride] - big);
            }
            v = sum / total;
            out[(t * N_HEADS + h) * HEAD_DIM + d] = v;
        }
        if (q8) {
            staged[lane] = v;
            workgroupBarrier();
            if (lane == 0u) {
                var block: array<f32, 32>;
                for (var i = 0u; i < 32u; i++) {
                    block[i] = staged[i];
                }
                let words = q8_words(&block);
                for (var j = 0u; j < 10u; j++) {
                    out_q8[q8_index(N_HEADS * HEAD_DIM, t, (h * HEAD_DIM + d0) / 32u, j)] = words[j];
                }
            }
            workgroupBarrier();
        }
    }
}
