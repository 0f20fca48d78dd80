// The paged K/V cache as f16 (`KvDtype::F16`, the default): four values an element, two to a
// word (pack2x16float), so no adapter needs the f16 shader type. Half the memory and half the
// bytes attention reads of f32; values round to f16 once, when written (values beyond ±65504,
// far past any K or V a model produces, are not representable). KV_ACCESS is the kernel's
// access (`Kernel::source`).

@group(0) @binding(4) var<storage, KV_ACCESS> k_cache: array<vec2<u32>>;
@group(0) @binding(5) var<storage, KV_ACCESS> v_cache: array<vec2<u32>>;

fn k_load4(i: u32) -> vec4<f32> {
    let w = k_cache[i];
    return vec4<f32>(unpack2x16float(w.x), unpack2x16float(w.y));
}

fn v_load4(i: u32) -> vec4<f32> {
    let w = v_cache[i];
    return vec4<f32>(unpack2x16float(w.x), unpack2x16float(w.y));
}
