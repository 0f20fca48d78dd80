// SwiGLU over gate and up side by side, [gate | up] per token: the gate half becomes
// silu(gate) * up, which the down projection reads.

override FFN_DIM: u32;

@group(0) @binding(0) var<uniform> step: Step;
@group(0) @binding(1) var<storage, read_write> gate_up: array<f32>;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    if (gid.y >= step.n_tokens || gid.x >= FFN_DIM) {
        return;
    }
    let i = gid.y * 2u * FFN_DIM + gid.x;
    let g = gate_up[i];
    gate_up[i] = g / (1.0 + exp(-g)) * gate_up[i + FFN_DIM];
}
