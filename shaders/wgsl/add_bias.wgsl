// Adds a bias vector to every token's row: y[t][i] += b[i] for i < WIDTH (Qwen2's Q, K and V
// biases, added to the fused projection's output).

override WIDTH: u32;

@group(0) @binding(0) var<uniform> step: Step;
@group(0) @binding(1) var<storage, read_write> y: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<f32>;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.x;
    let t = gid.y;
    if (t >= step.n_tokens || i >= WIDTH) {
        return;
    }
    y[t * WIDTH + i] += b[i];
}
