// Writes of two values from value index e (even) of the f16 K/V cache: one word.

fn k_store2(e: u32, v: vec2<f32>) {
    k_cache[e / 4u][(e % 4u) / 2u] = pack2x16float(v);
}

fn v_store2(e: u32, v: vec2<f32>) {
    v_cache[e / 4u][(e % 4u) / 2u] = pack2x16float(v);
}
