// Writes of two values from value index e (even) of the f32 K/V cache.

fn k_store2(e: u32, v: vec2<f32>) {
    k_cache[e / 4u][e % 4u] = v.x;
    k_cache[e / 4u][e % 4u + 1u] = v.y;
}

fn v_store2(e: u32, v: vec2<f32>) {
    v_cache[e / 4u][e % 4u] = v.x;
    v_cache[e / 4u][e % 4u + 1u] = v.y;
}
