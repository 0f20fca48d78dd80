// What rope_kv.wgsl and norm_rope_kv.wgsl share: the shape, bindings 0-3, and the rotation of two
// pairs of one head with its store (a query head in place, a key head into the paged cache,
// kv_*_store.wgsl). Pair layout: GGUF stores Q/K rows permuted so rotated pairs are adjacent
// (2i, 2i+1); Hugging Face checkpoints pair i with i + HEAD_DIM/2 (NEOX).

override N_HEADS: u32;
override N_KV_HEADS: u32;
override HEAD_DIM: u32;
override NEOX: bool = false;

@group(0) @binding(0) var<uniform> step: Step;
@group(0) @binding(1) var<storage, read_write> qkv: array<f32>;
@group(0) @binding(2) var<storage, read> tokens: array<TokenInfo>;
// cos/sin per (position, pair), computed once in f64 on the CPU.
@group(0) @binding(3) var<storage, read> rope: array<vec2<f32>>;

// The elements of pairs p0 and p0 + 1 within a head: (a.x, b.x) and (a.y, b.y).
struct PairElems {
    a: vec2<u32>,
    b: vec2<u32>,
}

fn pair_elems(p0: u32) -> PairElems {
    if (NEOX) {
        let a = vec2<u32>(p0, p0 + 1u);
        return PairElems(a, a + HEAD_DIM / 2u);
    }
    let a = vec2<u32>(2u * p0, 2u * p0 + 2u);
    return PairElems(a, a + 1u);
}

// Rotates pairs p0 and p0 + 1 of head `head` of the token `info` whose row of qkv starts at
// `row`, given their values `x0` (the pairs' first elements) and `x1` (their second).
fn rope_store(row: u32, head: u32, p0: u32, info: TokenInfo, x0: vec2<f32>, x1: vec2<f32>) {
    let half_dim = HEAD_DIM / 2u;
    let kv_dim = N_KV_HEADS * HEAD_DIM;
    let e = pair_elems(p0);
    let cs0 = rope[info.pos * half_dim + p0];
    let cs1 = rope[info.pos * half_dim + p0 + 1u];
    let cs_x = vec2<f32>(cs0.x, cs1.x);
    let cs_y = vec2<f32>(cs0.y, cs1.y);
    let r0 = x0 * cs_x - x1 * cs_y;
    let r1 = x0 * cs_y + x1 * cs_x;
    if (head < N_HEADS) {
        let src = row + head * HEAD_DIM;
        qkv[src + e.a.x] = r0.x;
        qkv[src + e.b.x] = r1.x;
        qkv[src + e.a.y] = r0.y;
        qkv[src + e.b.y] = r1.y;
    } else {
        let dst = info.slot * kv_dim + (head - N_HEADS) * HEAD_DIM;
        if (NEOX) {
            // Elements p0, p0 + 1 and p0 + half, p0 + half + 1.
            k_store2(dst + e.a.x, r0);
            k_store2(dst + e.b.x, r1);
        } else {
            // Elements 2 p0 .. 2 p0 + 3, as (r0.x, r1.x), (r0.y, r1.y).
            k_store2(dst + e.a.x, vec2<f32>(r0.x, r1.x));
            k_store2(dst + e.a.y, vec2<f32>(r0.y, r1.y));
        }
    }
}

// Copies V elements e, e + 1 (e even, counted over the token's V heads) into the cache.
fn v_copy2(row: u32, info: TokenInfo, e: u32) {
    let kv_dim = N_KV_HEADS * HEAD_DIM;
    let src = row + N_HEADS * HEAD_DIM + kv_dim + e;
    v_store2(info.slot * kv_dim + e, vec2<f32>(qkv[src], qkv[src + 1u]));
}
