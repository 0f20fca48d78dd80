// SwiGLU over gate and up side by side, [gate | up] per token: the gate half becomes
// silu(gate) * up, which the down projection reads. With Q8 (FFN_DIM a multiple of 32), decode
// steps also get it as 8-bit activations for matvec_q8.wgsl, blocks laid out for rows
// 2 * FFN_DIM wide (the down projection's input stride).

override FFN_DIM: u32;
override Q8: bool = false;

const WG: u32 = 64u;

@group(0) @binding(0) var<uniform> step: Step;
@group(0) @binding(1) var<storage, read_write> gate_up: array<f32>;
@group(0) @binding(2) var<storage, read_write> out_q8: array<u32>;

var<workgroup> staged: array<f32, WG>;

@compute @workgroup_size(WG)
fn main(@builtin(local_invocation_index) lane: u32, @builtin(workgroup_id) wg: vec3<u32>) {
    let t = wg.y;
    // Uniform across the workgroup, so the barrier below stays in uniform control flow.
    if (t >= step.n_tokens) {
        return;
    }
    let c = wg.x * WG + lane;
    var v = 0.0;
    if (c < FFN_DIM) {
        let i = t * 2u * FFN_DIM + c;
        let g = gate_up[i];
        v = g / (1.0 + exp(-g)) * gate_up[i + FFN_DIM];
        gate_up[i] = v;
    }
    if (Q8 && step.n_tokens <= Q8_TOKENS) {
        staged[lane] = v;
        workgroupBarrier();
        if (lane % 32u == 0u && c < FFN_DIM) {
            var block: array<f32, 32>;
            for (var i = 0u; i < 32u; i++) {
                block[i] = staged[lane + i];
            }
            let words = q8_words(&block);
            for (var j = 0u; j < 10u; j++) {
                out_q8[q8_index(2u * FFN_DIM, t, c / 32u, j)] = words[j];
            }
        }
    }
}
