// Rotary position embedding on Q (in place) and K, and the write of K and V into the paged cache
// (kv_*.wgsl: f16 or f32). Each invocation rotates two consecutive pairs of one head, or copies
// two V elements, so it owns whole words of an f16 cache.

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let t = gid.y;
    if (t >= step.n_tokens) {
        return;
    }
    let half_dim = HEAD_DIM / 2u;
    let row = t * (N_HEADS + 2u * N_KV_HEADS) * HEAD_DIM;
    // Invocations that rotate: two pairs each.
    let n_rot = (N_HEADS + N_KV_HEADS) * half_dim / 2u;
    let info = tokens[t];
    let i = gid.x;
    if (i < n_rot) {
        let head = i / (half_dim / 2u);
        let p0 = 2u * (i % (half_dim / 2u));
        let src = row + head * HEAD_DIM;
        let e = pair_elems(p0);
        let x0 = vec2<f32>(qkv[src + e.a.x], qkv[src + e.a.y]);
        let x1 = vec2<f32>(qkv[src + e.b.x], qkv[src + e.b.y]);
        rope_store(row, head, p0, info, x0, x1);
    } else if (i < n_rot + N_KV_HEADS * HEAD_DIM / 2u) {
        v_copy2(row, info, 2u * (i - n_rot));
    }
}
