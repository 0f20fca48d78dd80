// Causal attention over the paged KV cache, for prefill chunks and decode tokens alike, split
// over the key positions (flash-decoding): the query at position p attends to positions 0..=p of
// its own sequence, read through its block table, in chunks of CHUNK = 256 positions. One
// workgroup per (head, token, chunk); each of its 8 subgroups of 32 lanes scores 32 positions
// (a lane a position) and keeps their softmax state (max, sum, weighted values), and the
// workgroup combines the 8 states in order. A token whose whole prefix is one chunk is done: when
// the step has one chunk per token (a grid one chunk deep) the workgroup writes the output
// itself, with its 8-bit copy (Q8), and the step records no merge. Otherwise it writes the
// chunk's state to `partials`, packed by the tokens' `chunk_off`, and attention_merge.wgsl
// combines the chunks in order with the same arithmetic, so a one-chunk token's output is the
// same bits either way.
//
// Lanes map to fixed positions and states combine in a fixed order, so a token's output depends
// only on its position and the cache: the same alone, batched, or in any prefill chunking.
//
// The 32 lanes of a subgroup find their scores' maximum and their probabilities' sum through the
// `lanes_*` functions: subgroup operations where subgroups are exactly 32 lanes
// (attention_lanes_subgroup.wgsl), workgroup memory and barriers elsewhere
// (attention_lanes_workgroup.wgsl).

override Q8: bool = false;

// Positions a subgroup scores at once, a lane each.
const SUB: u32 = 32u;
const WG: u32 = 256u;
const GROUPS: u32 = WG / SUB;
// Positions a workgroup covers (`ATTENTION_CHUNK` in tandem-shaders).
const CHUNK: u32 = WG;
const MAX_HEAD_DIM: u32 = 256u;
// Value runs of 4 dimensions a lane owns: lane i owns runs i and i + SUB.
const RUNS: u32 = MAX_HEAD_DIM / 4u / SUB;

// Bindings 0-7 in attention_io.wgsl (the cache's elements are 4 values, so a head, a multiple of
// 32 values, starts on one).
@group(0) @binding(8) var<storage, read_write> out_q8: array<u32>;

var<workgroup> q: array<vec4<f32>, MAX_HEAD_DIM / 4u>;
// Each subgroup's (max, sum) and weighted values, for the combination in subgroup order.
var<workgroup> group_ml: array<vec2<f32>, GROUPS>;
var<workgroup> group_acc: array<vec4<f32>, GROUPS * MAX_HEAD_DIM / 4u>;
// Each lane's probability, read by its subgroup's value loop.
var<workgroup> probs: array<f32, WG>;

@compute @workgroup_size(WG)
fn main(
    @builtin(local_invocation_index) li: u32,
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) grid: vec3<u32>,
) {
    let h = wg.x;
    let t = wg.y;
    let c = wg.z;
    // Both conditions are uniform across the workgroup, so the barriers below stay uniform.
    if (t >= step.n_tokens) {
        return;
    }
    let info = tokens[t];
    let n = info.pos + 1u;
    if (c * CHUNK >= n) {
        return;
    }
    let group = li / SUB;
    let lane = li % SUB;
    let lo = window_start(info.pos);
    // This subgroup's positions: start + 0..SUB, of which first..last are attended.
    let start = c * CHUNK + group * SUB;
    let first = max(start, lo);
    let last = min(start + SUB, n);
    let kv_dim = N_KV_HEADS * HEAD_DIM;
    let q_dim = N_HEADS * HEAD_DIM;
    let kvh = h / (N_HEADS / N_KV_HEADS);
    let q_base = t * (q_dim + 2u * kv_dim) + h * HEAD_DIM;
    for (var d = li; d < HEAD_DIM / 4u; d += WG) {
        let o = q_base + 4u * d;
        q[d] = vec4<f32>(qkv[o], qkv[o + 1u], qkv[o + 2u], qkv[o + 3u]) * SCALE;
    }
    workgroupBarrier();

    // Lane i scores position start + i. A subgroup with no position to attend to skips its
    // loads (uniform across the subgroup: prefill tokens early in a chunk leave most of the
    // workgroup's subgroups empty); within one, every lane loads a valid row and positions
    // outside first..last get probability 0, so the loops run without branches and their loads
    // overlap.
    let j = start + lane;
    let attends = j >= first && j < last;
    let some = first < last;
    var score = NEG_BIG;
    if (some) {
        let kb = (cache_row(info.table_off, clamp(j, first, last - 1u)) * kv_dim + kvh * HEAD_DIM) / 4u;
        var s = 0.0;
        for (var d = 0u; d < HEAD_DIM / 4u; d++) {
            s += dot(q[d], k_load4(kb + d));
        }
        score = select(NEG_BIG, s, attends);
    }
    // Every lane of a subgroup sees the same 32 values, so m and l agree across its lanes.
    let m = lanes_max(score, li);
    let p = select(0.0, exp(score - m), attends);
    let l = lanes_sum(p, li);
    probs[li] = p;
    workgroupBarrier();
    var acc: array<vec4<f32>, RUNS>;
    for (var e = 0u; e < RUNS; e++) {
        acc[e] = vec4<f32>(0.0);
    }
    if (some) {
        for (var i = 0u; i < SUB; i++) {
            // Each lane finds the row itself (the block table is in cache), so the value loads
            // wait on nothing but the probabilities.
            let v_row = (cache_row(info.table_off, clamp(start + i, first, last - 1u)) * kv_dim + kvh * HEAD_DIM) / 4u;
            let pi = probs[group * SUB + i];
            for (var e = 0u; e < RUNS; e++) {
                // Uniform: whole runs of SUB lanes past the head are skipped; lanes past the
                // head's last run (heads under 128 wide) repeat it and store nothing.
                if (e * SUB < HEAD_DIM / 4u) {
                    acc[e] += pi * v_load4(v_row + min(lane + e * SUB, HEAD_DIM / 4u - 1u));
                }
            }
        }
    }
    if (lane == 0u) {
        group_ml[group] = vec2<f32>(m, l);
    }
    for (var e = 0u; e < RUNS; e++) {
        let run = lane + e * SUB;
        if (run < HEAD_DIM / 4u) {
            group_acc[group * (MAX_HEAD_DIM / 4u) + run] = acc[e];
        }
    }
    workgroupBarrier();

    // Lane r < HEAD_DIM / 4 combines run r of the 8 states in subgroup order, rescaling as the
    // running maximum grows (attention_merge.wgsl's arithmetic).
    let r = min(li, HEAD_DIM / 4u - 1u);
    var big = NEG_BIG;
    var total = 0.0;
    var sum = vec4<f32>(0.0);
    for (var g = 0u; g < GROUPS; g++) {
        let ml = group_ml[g];
        let next = max(big, ml.x);
        let was = exp(big - next);
        let now = exp(ml.x - next);
        total = total * was + ml.y * now;
        sum = sum * was + group_acc[g * (MAX_HEAD_DIM / 4u) + r] * now;
        big = next;
    }
    let mine = li < HEAD_DIM / 4u;
    if (grid.z == 1u) {
        let v = select(vec4<f32>(0.0), sum / total, mine);
        let o = (t * N_HEADS + h) * HEAD_DIM + 4u * r;
        if (mine) {
            for (var k = 0u; k < 4u; k++) {
                out[o + k] = v[k];
            }
        }
        if (Q8 && step.n_tokens <= Q8_TOKENS) {
            let word = q8_lanes(li, v);
            if (mine) {
                q8_store_word(q_dim, t, (h * HEAD_DIM) / 4u + r, word);
            }
        }
        return;
    }
    let base = ((info.chunk_off + c) * N_HEADS + h) * (HEAD_DIM + 2u);
    if (li == 0u) {
        partials[base] = big;
        partials[base + 1u] = total;
    }
    if (mine) {
        for (var k = 0u; k < 4u; k++) {
            partials[base + 2u + 4u * r + k] = sum[k];
        }
    }
}
