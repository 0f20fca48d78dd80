// Causal attention over the paged KV cache, for prefill chunks and decode tokens alike, split
// over the key positions (flash-decoding): the query at position p attends to positions 0..=p of
// its own sequence, read through its block table, in chunks of CHUNK positions. One workgroup
// per (head, token, chunk) writes the chunk's softmax state (max, sum, weighted values) to
// `partials`, packed by the tokens' `chunk_off`; attention_merge.wgsl combines the chunks in order.
//
// Chunks start at fixed positions (multiples of CHUNK), each is walked 32 positions at a time in
// order, and lanes combine in lane order, so a token's output depends only on its position and
// the cache: the same alone, batched, or in any prefill chunking.
//
// The 32 lanes exchange scores and probabilities through the `lanes_*` functions: subgroup
// operations where a subgroup is exactly the workgroup (attention_lanes_subgroup.wgsl), workgroup
// memory and barriers elsewhere (attention_lanes_workgroup.wgsl).

override N_HEADS: u32;
override N_KV_HEADS: u32;
override HEAD_DIM: u32;
override BLOCK_TOKENS: u32;
override SCALE: f32;
// Key positions per chunk.
override CHUNK: u32;
// Sliding-window layers: the query at position p sees only positions p - WINDOW + 1..=p (llama.cpp's
// standard window); 0 sees the whole prefix. A chunk wholly before the window writes an empty state.
override WINDOW: u32 = 0u;

const WG: u32 = 32u;
const MAX_HEAD_DIM: u32 = 256u;
// Value runs of 4 dimensions a lane owns: lane i owns runs i and i + WG.
const RUNS: u32 = MAX_HEAD_DIM / 4u / WG;
const NEG_BIG: f32 = -3.0e38;

@group(0) @binding(0) var<uniform> step: Step;
@group(0) @binding(1) var<storage, read> qkv: array<f32>;
@group(0) @binding(2) var<storage, read> tokens: array<TokenInfo>;
@group(0) @binding(3) var<storage, read> tables: array<u32>;
// Bindings 4 and 5, the K/V cache, come with its format (kv_*.wgsl): elements of 4 values, so a
// head (a multiple of 32 values) starts on an element.
// Per (chunk of the step, head): [max, sum, HEAD_DIM weighted values].
@group(0) @binding(6) var<storage, read_write> partials: array<f32>;

var<workgroup> q: array<vec4<f32>, MAX_HEAD_DIM / 4u>;

@compute @workgroup_size(WG)
fn main(@builtin(local_invocation_index) lane: u32, @builtin(workgroup_id) wg: vec3<u32>) {
    let h = wg.x;
    let t = wg.y;
    let c = wg.z;
    if (t >= step.n_tokens) {
        return;
    }
    let info = tokens[t];
    let n = info.pos + 1u;
    if (c * CHUNK >= n) {
        return;
    }
    var lo = 0u;
    if (WINDOW > 0u && n > WINDOW) {
        lo = n - WINDOW;
    }
    let first = max(c * CHUNK, lo);
    let last = min(c * CHUNK + CHUNK, n);
    let kv_dim = N_KV_HEADS * HEAD_DIM;
    let q_dim = N_HEADS * HEAD_DIM;
    let kvh = h / (N_HEADS / N_KV_HEADS);
    let q_base = t * (q_dim + 2u * kv_dim) + h * HEAD_DIM;
    for (var d = lane; d < HEAD_DIM / 4u; d += WG) {
        let o = q_base + 4u * d;
        q[d] = vec4<f32>(qkv[o], qkv[o + 1u], qkv[o + 2u], qkv[o + 3u]) * SCALE;
    }
    workgroupBarrier();

    var m = NEG_BIG;
    var l = 0.0;
    // Lane i owns dimensions 4i..4i+3 (and 4(i + WG).. past 128) of the values (lanes past
    // HEAD_DIM / 4 only score): one 16-byte load a position instead of HEAD_DIM / 32 scalar ones.
    var acc: array<vec4<f32>, RUNS>;
    for (var e = 0u; e < RUNS; e++) {
        acc[e] = vec4<f32>(0.0);
    }
    for (var j0 = first; j0 < last; j0 += WG) {
        // Lane i scores position j0 + i; positions past the chunk get probability 0 and a valid
        // row, so the loops below have a fixed trip count and their loads overlap.
        let j = j0 + lane;
        var score = NEG_BIG;
        var row = tables[info.table_off + j0 / BLOCK_TOKENS] * BLOCK_TOKENS + j0 % BLOCK_TOKENS;
        if (j < last) {
            row = tables[info.table_off + j / BLOCK_TOKENS] * BLOCK_TOKENS + j % BLOCK_TOKENS;
            let kb = (row * kv_dim + kvh * HEAD_DIM) / 4u;
            score = 0.0;
            for (var d = 0u; d < HEAD_DIM / 4u; d++) {
                score += dot(q[d], k_load4(kb + d));
            }
        }
        // Every lane sees the same 32 values, so m and l agree across lanes.
        let m_new = max(m, lanes_max(score, lane));
        let prob = select(0.0, exp(score - m_new), j < last);
        lanes_publish(prob, row * kv_dim + kvh * HEAD_DIM, lane);
        let scale = exp(m - m_new);
        l = l * scale + published_sum();
        var sum: array<vec4<f32>, RUNS>;
        for (var e = 0u; e < RUNS; e++) {
            sum[e] = vec4<f32>(0.0);
        }
        for (var i = 0u; i < WG; i++) {
            let p = lane_prob(i);
            let v_row = lane_row(i) / 4u;
            for (var e = 0u; e < RUNS; e++) {
                if (lane + e * WG < HEAD_DIM / 4u) {
                    sum[e] += p * v_load4(v_row + lane + e * WG);
                }
            }
        }
        for (var e = 0u; e < RUNS; e++) {
            acc[e] = acc[e] * scale + sum[e];
        }
        m = m_new;
        lanes_release();
    }
    let base = ((info.chunk_off + c) * N_HEADS + h) * (HEAD_DIM + 2u);
    if (lane == 0u) {
        partials[base] = m;
        partials[base + 1u] = l;
    }
    for (var e = 0u; e < RUNS; e++) {
        let run = lane + e * WG;
        if (run < HEAD_DIM / 4u) {
            for (var k = 0u; k < 4u; k++) {
                partials[base + 2u + 4u * run + k] = acc[e][k];
            }
        }
    }
}

// Attention's lane exchange through subgroup operations: chosen only where every subgroup is
// exactly 32 lanes, so the workgroup is one subgroup and needs no barriers.

var<private> published_p: f32;
var<private> published_row: u32;

/// The largest of the 32 lanes' `v`.
fn lanes_max(v: f32, lane: u32) -> f32 {
    return subgroupMax(v);
}

/// Makes each lane's probability and value row readable by every lane (`lane_prob`, `lane_row`).
fn lanes_publish(p: f32, row: u32, lane: u32) {
    published_p = p;
    published_row = row;
}

/// The sum of the published probabilities.
fn published_sum() -> f32 {
    return subgroupAdd(published_p);
}

fn lane_prob(i: u32) -> f32 {
    return subgroupShuffle(published_p, i);
}

fn lane_row(i: u32) -> u32 {
    return subgroupShuffle(published_row, i);
}

fn lanes_release() {}
