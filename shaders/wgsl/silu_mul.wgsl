// SwiGLU (or GeGLU) over gate and up side by side, [gate | up] per token: the gate half becomes
// silu(gate) * up, which the down projection reads. A lane takes 4 consecutive values. With Q8
// (FFN_DIM a multiple of 32), decode steps also get it as 8-bit activations for matvec_q8.wgsl,
// blocks laid out for rows 2 * FFN_DIM wide (the down projection's input stride).

override FFN_DIM: u32;
override Q8: bool = false;
// GeGLU with GELU's tanh form (Gemma) instead of SiLU: 0.5 g (1 + tanh(u)) = g / (1 + exp(-2u)),
// u = sqrt(2/pi) (g + 0.044715 g^3), which stays finite where tanh's exponentials overflow.
override GELU: bool = false;

const WG: u32 = 64u;

@group(0) @binding(0) var<uniform> step: Step;
@group(0) @binding(1) var<storage, read_write> gate_up: array<f32>;
@group(0) @binding(2) var<storage, read_write> out_q8: array<u32>;

@compute @workgroup_size(WG)
fn main(@builtin(local_invocation_index) lane: u32, @builtin(workgroup_id) wg: vec3<u32>) {
    let t = wg.y;
    // Uniform across the workgroup, so q8_lanes' barriers stay in uniform control flow.
    if (t >= step.n_tokens) {
        return;
    }
    let w = wg.x * WG + lane;
    var v = vec4<f32>(0.0);
    for (var i = 0u; i < 4u; i++) {
        let c = 4u * w + i;
        if (c < FFN_DIM) {
            let at = t * 2u * FFN_DIM + c;
            let g = gate_up[at];
            var act = g / (1.0 + exp(-g));
            if (GELU) {
                act = g / (1.0 + exp(-2.0 * 0.7978845608 * (g + 0.044715 * g * g * g)));
            }
            v[i] = act * gate_up[at + FFN_DIM];
            gate_up[at] = v[i];
        }
    }
    if (Q8 && step.n_tokens <= Q8_TOKENS) {
        let q = q8_lanes(lane, v);
        if (4u * w < FFN_DIM) {
            q8_store_word(2u * FFN_DIM, t, w, q);
        }
    }
}
