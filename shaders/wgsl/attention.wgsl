// Causal attention over the paged KV cache, for prefill chunks and decode tokens alike: the query
// at position p attends to positions 0..=p of its own sequence, read through its block table.
//
// One workgroup per (head, token). Lane j visits positions j, j + WG, ... with an online softmax;
// the lanes are then merged in lane order. The order depends only on p, so a token's output is the
// same whether it was computed alone, in a batch, or in any prefill chunk.

override N_HEADS: u32;
override N_KV_HEADS: u32;
override HEAD_DIM: u32;
override BLOCK_TOKENS: u32;
override SCALE: f32;

const WG: u32 = 32u;
const MAX_HEAD_DIM: u32 = 256u;
const NEG_BIG: f32 = -3.0e38;

@group(0) @binding(0) var<uniform> step: Step;
@group(0) @binding(1) var<storage, read> qkv: array<f32>;
@group(0) @binding(2) var<storage, read> tokens: array<TokenInfo>;
@group(0) @binding(3) var<storage, read> tables: array<u32>;
@group(0) @binding(4) var<storage, read> k_cache: array<f32>;
@group(0) @binding(5) var<storage, read> v_cache: array<f32>;
@group(0) @binding(6) var<storage, read_write> out: array<f32>;

var<workgroup> lane_max: array<f32, WG>;
var<workgroup> lane_sum: array<f32, WG>;
var<workgroup> merge: array<f32, 1024>;

@compute @workgroup_size(WG)
fn main(@builtin(local_invocation_index) lane: u32, @builtin(workgroup_id) wg: vec3<u32>) {
    let h = wg.x;
    let t = wg.y;
    if (t >= step.n_tokens) {
        return;
    }
    let kv_dim = N_KV_HEADS * HEAD_DIM;
    let q_dim = N_HEADS * HEAD_DIM;
    let kvh = h / (N_HEADS / N_KV_HEADS);
    let info = tokens[t];
    let n = info.pos + 1u;

    var q: array<f32, MAX_HEAD_DIM>;
    let q_base = t * (q_dim + 2u * kv_dim) + h * HEAD_DIM;
    for (var d = 0u; d < HEAD_DIM; d++) {
        q[d] = qkv[q_base + d] * SCALE;
    }

    var m = NEG_BIG;
    var l = 0.0;
    var acc: array<f32, MAX_HEAD_DIM>;
    for (var j = lane; j < n; j += WG) {
        let row = tables[info.table_off + j / BLOCK_TOKENS] * BLOCK_TOKENS + j % BLOCK_TOKENS;
        let kb = row * kv_dim + kvh * HEAD_DIM;
        var score = 0.0;
        for (var d = 0u; d < HEAD_DIM; d++) {
            score += q[d] * k_cache[kb + d];
        }
        let m_new = max(m, score);
        let c = exp(m - m_new);
        let pj = exp(score - m_new);
        l = l * c + pj;
        for (var d = 0u; d < HEAD_DIM; d++) {
            acc[d] = acc[d] * c + pj * v_cache[kb + d];
        }
        m = m_new;
    }

    lane_max[lane] = m;
    lane_sum[lane] = l;
    workgroupBarrier();
    var big = NEG_BIG;
    for (var i = 0u; i < WG; i++) {
        big = max(big, lane_max[i]);
    }
    var total = 0.0;
    for (var i = 0u; i < WG; i++) {
        total += lane_sum[i] * exp(lane_max[i] - big);
    }
    let f = exp(m - big);

    // Merge the lanes' accumulators WG dimensions at a time, summing lanes in a fixed order.
    let o_base = t * q_dim + h * HEAD_DIM;
    for (var c0 = 0u; c0 < HEAD_DIM; c0 += WG) {
        for (var d = 0u; d < WG; d++) {
            merge[lane * WG + d] = acc[c0 + d] * f;
        }
        workgroupBarrier();
        var sum = 0.0;
        for (var i = 0u; i < WG; i++) {
            sum += merge[i * WG + lane];
        }
        out[o_base + c0 + lane] = sum / total;
        workgroupBarrier();
    }
}
