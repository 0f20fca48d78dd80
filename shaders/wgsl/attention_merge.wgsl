// Combines attention.wgsl's per-chunk softmax states of each (head, token), in chunk order
// (`merge_run`, merge_chunks.wgsl). With Q8
// (HEAD_DIM a multiple of 32), decode steps also get `out` as 8-bit activations for
// matvec_q8.wgsl.

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
    let q8 = Q8 && step.n_tokens <= Q8_TOKENS;
    // A lane 4 consecutive dimensions, a trip 4 * WG of them.
    for (var d0 = 0u; d0 < HEAD_DIM; d0 += 4u * WG) {
        let d = min(d0 + 4u * lane, HEAD_DIM - 4u);
        let v = merge_run(base, stride, chunks, d);
        if (d0 + 4u * lane < HEAD_DIM) {
            for (var i = 0u; i < 4u; i++) {
                out[(t * N_HEADS + h) * HEAD_DIM + d + i] = v[i];
            }
        }
        if (q8) {
            let q = q8_lanes(lane, select(vec4<f32>(0.0), v, d0 + 4u * lane < HEAD_DIM));
            if (d0 + 4u * lane < HEAD_DIM) {
                q8_store_word(N_HEADS * HEAD_DIM, t, (h * HEAD_DIM + d) / 4u, q);
            }
        }
    }
}
