// F16 weights read as WGSL `f16`, on SHADER_F16 adapters.
@group(0) @binding(3) var<storage, read> w: array<f16>;

fn half_at(e: u32) -> f32 {
    return f32(w[e]);
}

/// Halves e..e+4, for e a multiple of 4.
fn half4_at(e: u32) -> vec4<f32> {
    return vec4<f32>(vec4<f16>(w[e], w[e + 1u], w[e + 2u], w[e + 3u]));
}
