// rope_kv.wgsl for the families that RMSNorm every query and key head on its own before RoPE
// (Gemma 3, Qwen3): head h < N_HEADS of token t is scaled by `gq`, the key heads after it by `gk`,
// then rotated and stored as rope_kv stores them. One workgroup per (head, token), and one per
// (V head, token) after the query and key heads; the sum of squares goes by a fixed tree, so a
// head's result depends only on its values.

override EPS: f32;

const WG: u32 = 64u;

@group(0) @binding(6) var<storage, read> gq: array<f32>;
@group(0) @binding(7) var<storage, read> gk: array<f32>;

var<workgroup> red: array<f32, WG>;

@compute @workgroup_size(WG)
fn main(@builtin(local_invocation_index) lane: u32, @builtin(workgroup_id) wg: vec3<u32>) {
    let h = wg.x;
    let t = wg.y;
    if (t >= step.n_tokens) {
        return;
    }
    let info = tokens[t];
    let row = t * (N_HEADS + 2u * N_KV_HEADS) * HEAD_DIM;
    if (h >= N_HEADS + N_KV_HEADS) {
        let v_head = (h - N_HEADS - N_KV_HEADS) * HEAD_DIM;
        for (var e = 2u * lane; e < HEAD_DIM; e += 2u * WG) {
            v_copy2(row, info, v_head + e);
        }
        return;
    }
    let base = row + h * HEAD_DIM;
    var sum = 0.0;
    for (var i = lane; i < HEAD_DIM; i += WG) {
        let v = qkv[base + i];
        sum += v * v;
    }
    red[lane] = sum;
    workgroupBarrier();
    for (var stride = WG / 2u; stride > 0u; stride >>= 1u) {
        if (lane < stride) {
            red[lane] += red[lane + stride];
        }
        workgroupBarrier();
    }
    let inv = inverseSqrt(workgroupUniformLoad(&red[0]) / f32(HEAD_DIM) + EPS);
    // Each lane rotates pairs p0 and p0 + 1, reading only the elements it writes.
    for (var p0 = 2u * lane; p0 < HEAD_DIM / 2u; p0 += 2u * WG) {
        let e = pair_elems(p0);
        let x0 = vec2<f32>(normed(base, h, e.a.x, inv), normed(base, h, e.a.y, inv));
        let x1 = vec2<f32>(normed(base, h, e.b.x, inv), normed(base, h, e.b.y, inv));
        rope_store(row, h, p0, info, x0, x1);
    }
}

fn normed(base: u32, h: u32, i: u32, inv: f32) -> f32 {
    var g = gk[i];
    if (h < N_HEADS) {
        g = gq[i];
    }
    return qkv[base + i] * inv * g;
}
