// SwiGLU: gate[t, i] = silu(gate[t, i]) * up[t, i].

override FFN_DIM: u32;

@group(0) @binding(0) var<uniform> step: Step;
@group(0) @binding(1) var<storage, read_write> gate: array<f32>;
@group(0) @binding(2) var<storage, read> up: array<f32>;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    if (gid.y >= step.n_tokens || gid.x >= FFN_DIM) {
        return;
    }
    let i = gid.y * FFN_DIM + gid.x;
    let g = gate[i];
    gate[i] = g / (1.0 + exp(-g)) * up[i];
}
