// The activations of the matmul kernels that read them as f32.
@group(0) @binding(2) var<storage, read> x: array<f32>;
// The same buffer as `x`, for the 16-byte loads of block formats (their rows are 32-aligned).
@group(0) @binding(6) var<storage, read> x_vec: array<vec4<f32>>;

/// x[o..o+4] for o a multiple of 4.
fn x4(o: u32) -> vec4<f32> {
    return x_vec[o >> 2u];
}
