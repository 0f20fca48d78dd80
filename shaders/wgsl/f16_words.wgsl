// F16 weights as u32 words, two halves each (low half first), for adapters without SHADER_F16.
@group(0) @binding(3) var<storage, read> w: array<u32>;

fn half_at(e: u32) -> f32 {
    return unpack2x16float(w[e >> 1u])[e & 1u];
}

/// Halves e..e+4, for e a multiple of 4.
fn half4_at(e: u32) -> vec4<f32> {
    return vec4<f32>(unpack2x16float(w[e >> 1u]), unpack2x16float(w[(e >> 1u) + 1u]));
}
