// Rotary position embedding on Q (in place) and K, and the write of K and V into the paged cache
// (kv_*.wgsl: f16 or f32). Each invocation rotates two consecutive pairs of one head, or copies
// two V elements, so it owns whole words of an f16 cache.
// Pair layout: GGUF stores Q/K rows permuted so rotated pairs are adjacent (2i, 2i+1); Hugging
// Face checkpoints pair i with i + HEAD_DIM/2 (NEOX).

override N_HEADS: u32;
override N_KV_HEADS: u32;
override HEAD_DIM: u32;
override NEOX: bool = false;

@group(0) @binding(0) var<uniform> step: Step;
@group(0) @binding(1) var<storage, read_write> qkv: array<f32>;
@group(0) @binding(2) var<storage, read> tokens: array<TokenInfo>;
// cos/sin per (position, pair), computed once in f64 on the CPU.
@group(0) @binding(3) var<storage, read> rope: array<vec2<f32>>;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let t = gid.y;
    if (t >= step.n_tokens) {
        return;
    }
    let half_dim = HEAD_DIM / 2u;
    let kv_dim = N_KV_HEADS * HEAD_DIM;
    let q_dim = N_HEADS * HEAD_DIM;
    let stride = q_dim + 2u * kv_dim;
    // Invocations that rotate: two pairs each.
    let n_rot = (N_HEADS + N_KV_HEADS) * half_dim / 2u;
    let info = tokens[t];
    let i = gid.x;
    let row = t * stride;

    if (i < n_rot) {
        let head = i / (half_dim / 2u);
        let p0 = 2u * (i % (half_dim / 2u));
        let src = row + head * HEAD_DIM;
        // Element indices of pairs p0 and p0 + 1: (a0, b0), (a1, b1).
        var a = vec2<u32>(2u * p0, 2u * p0 + 2u);
        var b = a + 1u;
        if (NEOX) {
            a = vec2<u32>(p0, p0 + 1u);
            b = a + half_dim;
        }
        let cs0 = rope[info.pos * half_dim + p0];
        let cs1 = rope[info.pos * half_dim + p0 + 1u];
        let x0 = vec2<f32>(qkv[src + a.x], qkv[src + a.y]);
        let x1 = vec2<f32>(qkv[src + b.x], qkv[src + b.y]);
        let cs_x = vec2<f32>(cs0.x, cs1.x);
        let cs_y = vec2<f32>(cs0.y, cs1.y);
        let r0 = x0 * cs_x - x1 * cs_y;
        let r1 = x0 * cs_y + x1 * cs_x;
        if (head < N_HEADS) {
            qkv[src + a.x] = r0.x;
            qkv[src + b.x] = r1.x;
            qkv[src + a.y] = r0.y;
            qkv[src + b.y] = r1.y;
        } else {
            let dst = info.slot * kv_dim + (head - N_HEADS) * HEAD_DIM;
            if (NEOX) {
                // Elements p0, p0 + 1 and p0 + half, p0 + half + 1.
                k_store2(dst + a.x, r0);
                k_store2(dst + b.x, r1);
            } else {
                // Elements 2 p0 .. 2 p0 + 3, as (r0.x, r1.x), (r0.y, r1.y).
                k_store2(dst + a.x, vec2<f32>(r0.x, r1.x));
                k_store2(dst + a.y, vec2<f32>(r0.y, r1.y));
            }
        }
    } else if (i < n_rot + kv_dim / 2u) {
        let e = 2u * (i - n_rot);
        let src = row + q_dim + kv_dim + e;
        v_store2(info.slot * kv_dim + e, vec2<f32>(qkv[src], qkv[src + 1u]));
    }
}
