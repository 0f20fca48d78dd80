// The paged K/V cache as f32 (`KvDtype::F32`): four values an element. KV_ACCESS is the kernel's
// access (`Kernel::source`).

@group(0) @binding(4) var<storage, KV_ACCESS> k_cache: array<vec4<f32>>;
@group(0) @binding(5) var<storage, KV_ACCESS> v_cache: array<vec4<f32>>;

fn k_load4(i: u32) -> vec4<f32> {
    return k_cache[i];
}

fn v_load4(i: u32) -> vec4<f32> {
    return v_cache[i];
}
