// Rotary position embedding on Q (in place) and K, and the write of K and V into the paged cache.
// Each invocation rotates one pair of one head, or copies one V element.
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
@group(0) @binding(4) var<storage, read_write> k_cache: array<f32>;
@group(0) @binding(5) var<storage, read_write> v_cache: array<f32>;

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
    let n_pairs = (N_HEADS + N_KV_HEADS) * half_dim;
    let info = tokens[t];
    let i = gid.x;
    let row = t * stride;

    if (i < n_pairs) {
        let head = i / half_dim;
        let pair = i % half_dim;
        var a = 2u * pair;
        var b = 2u * pair + 1u;
        if (NEOX) {
            a = pair;
            b = pair + half_dim;
        }
        let cs = rope[info.pos * half_dim + pair];
        let src = row + head * HEAD_DIM;
        let x0 = qkv[src + a];
        let x1 = qkv[src + b];
        let r0 = x0 * cs.x - x1 * cs.y;
        let r1 = x0 * cs.y + x1 * cs.x;
        if (head < N_HEADS) {
            qkv[src + a] = r0;
            qkv[src + b] = r1;
        } else {
            let dst = info.slot * kv_dim + (head - N_HEADS) * HEAD_DIM;
            k_cache[dst + a] = r0;
            k_cache[dst + b] = r1;
        }
    } else if (i < n_pairs + kv_dim) {
        let e = i - n_pairs;
        v_cache[info.slot * kv_dim + e] = qkv[row + q_dim + kv_dim + e];
    }
}
