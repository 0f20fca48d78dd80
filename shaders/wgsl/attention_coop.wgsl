// Causal attention for prefill steps on the adapter's matrix units (cooperative-matrix
// multiply-adds, 16 x 16 x 16, f16 inputs, f32 sums), for adapters whose subgroups are 32 lanes,
// an f16 K/V cache, and heads 64, 128 or 256 wide. attention.wgsl gives every (head, token, chunk) a
// workgroup, so each query reads its keys alone and a 512-token prefill is tens of thousands of
// latency-bound workgroups; here a workgroup takes ROWS consecutive tokens of one sequence (a
// tile, listed by the CPU in `tiles`) against one CHUNK of key positions, and each K/V row it
// loads serves all of them.
//
// The tile's 4 subgroups own 16 query rows each; their queries (scaled, as f16) stay in
// registers. The chunk's keys pass through workgroup memory KEYS at a time, twice: the first
// pass finds each row's maximum score and the sum of its exponentials, the second turns scores
// into probabilities exp(s - max) (f16, at most 1) and adds P V into the output's
// accumulators, so the accumulators are never rescaled (a matrix-unit accumulator cannot be
// scaled by row). The chunk's state goes out as attention.wgsl's does: the output itself when
// the step has one chunk a token (a grid one chunk deep), else (max, sum, weighted values) into
// `partials` for attention_merge.wgsl.
//
// A workgroup writes at most MAX_HEAD_DIM dimensions of the output: 256-wide heads (Gemma 3) take
// two workgroups each (`HALVES`, the grid's x being heads times halves), each with the whole
// query and keys for the scores and its half of the values, so the workgroup's memory stays
// what 128-wide heads need, and the scores are computed twice.
//
// Not batch-invariant (a row's sums depend on its tile and its f16 rounding), so fast mode only;
// the engine takes it on steps whose every sequence brings at least ATTENTION_TILE_MIN tokens.

// Query rows a workgroup (`ATTENTION_TILE_ROWS` in tandem-shaders), 16 a subgroup.
const ROWS: u32 = 64u;
const WG: u32 = 128u;
// Key positions a step, and a chunk's (`ATTENTION_CHUNK`).
const KEYS: u32 = 32u;
const CHUNK: u32 = 256u;
// Output dimensions a workgroup (and value dimensions in `vt`).
const MAX_HEAD_DIM: u32 = 128u;
// Row strides in f16 of the Q and K tiles and of the probabilities and transposed values,
// padded so fragment loads of consecutive rows fall on different banks: by 4, to an odd number
// of runs of 4. With an even number, NVIDIA's 580 driver dropped the last 4 columns of the
// fragments loaded at the tile's last run of 4 used (dimensions 60-63 of 64-wide heads, keys
// 28-31), on every padding tried (docs/kernel-notes.md, item 32).
const LD: u32 = MAX_HEAD_DIM + 4u;
const LDV: u32 = LD / 4u;
// The keys' row stride in `tile`, in runs of 4: 256-wide heads' rows are 260 wide (65 runs,
// odd), the 32 of them fitting in the query tile's 64 rows of 132.
override LDK: u32 = select(LDV, (2u * MAX_HEAD_DIM + 4u) / 4u, HEAD_DIM > MAX_HEAD_DIM);
override HALVES: u32 = select(1u, 2u, HEAD_DIM > MAX_HEAD_DIM);
const LDP: u32 = KEYS + 4u;

// Bindings 0-7 in attention_io.wgsl (the cache: kv_f16.wgsl only). Each tile's first token in the
// step and its rows (at most ROWS consecutive tokens of one sequence).
@group(0) @binding(8) var<storage, read> tiles: array<vec2<u32>>;

// The tile's queries at first ([row][dimension]); then a step's keys in rows 0..KEYS.
var<workgroup> tile: array<vec4<f16>, ROWS * LDV>;
// A step's values transposed, [dimension][key], in runs of 4 keys: the output is accumulated
// transposed, O^T = V^T P^T, so every fragment loads in gemm_coop's shapes (A row-major, B
// column-major), the ones known to load exactly on NVIDIA.
var<workgroup> vt: array<vec4<f16>, MAX_HEAD_DIM * LDP / 4u>;
// Each subgroup's 16 x KEYS scores, column-major ([key][row]); at the end, its 16 x 16 outputs
// ([row][dimension]).
var<workgroup> scores: array<f32, WG / 32u * 16u * KEYS>;
// Each subgroup's 16 x KEYS probabilities, [row][key].
var<workgroup> probs: array<vec4<f16>, WG / 32u * 16u * LDP / 4u>;
// Each row's sum of exponentials, for the writers of the output.
var<workgroup> row_sum: array<f32, ROWS>;
var<workgroup> shared_u: u32;

// A run of 4 cache values as f16 (the cache holds f16 bits, two a word; naga 30 bitcasts no
// u32 to f16 pairs, so through f32, exactly).
fn halves(w: vec2<u32>) -> vec4<f16> {
    return vec4<f16>(vec4<f32>(unpack2x16float(w.x), unpack2x16float(w.y)));
}

/// Writes dimensions d0..d0 + 15 of the subgroup's 16 rows from its stage ([row][dimension]):
/// the output, or the chunk's weighted values. Called by every lane.
fn flush(sg: u32, lane: u32, d0: u32, h: u32, t0: u32, rows: u32, first: u32, c: u32, direct: bool) {
    workgroupBarrier();
    for (var e = lane; e < 256u; e += 32u) {
        let r = sg * 16u + e / 16u;
        let d = d0 + e % 16u;
        if (r < rows && first + r >= c * CHUNK) {
            let v = scores[sg * 512u + e];
            let t = t0 + r;
            if (direct) {
                let l = row_sum[r];
                out[(t * N_HEADS + h) * HEAD_DIM + d] = select(0.0, v / l, l > 0.0);
            } else {
                partials[((tokens[t].chunk_off + c) * N_HEADS + h) * (HEAD_DIM + 2u) + 2u + d] = v;
            }
        }
    }
    workgroupBarrier();
}

// Loads dimensions from4 * 4.. (128 of them) of the tile's queries, scaled, as f16 into `tile`
// ([row][dimension]); zeros past the head or the tile's rows.
fn load_queries(li: u32, t0: u32, rows: u32, h: u32, from4: u32) {
    let stride = N_HEADS * HEAD_DIM + 2u * N_KV_HEADS * HEAD_DIM;
    for (var e = li; e < ROWS * MAX_HEAD_DIM / 4u; e += WG) {
        let qr = e / (MAX_HEAD_DIM / 4u);
        let d4 = from4 + e % (MAX_HEAD_DIM / 4u);
        var v = vec4<f32>(0.0);
        if (qr < rows && d4 < HEAD_DIM / 4u) {
            let o = (t0 + qr) * stride + h * HEAD_DIM + 4u * d4;
            v = vec4<f32>(qkv[o], qkv[o + 1u], qkv[o + 2u], qkv[o + 3u]) * SCALE;
        }
        tile[qr * LDV + e % (MAX_HEAD_DIM / 4u)] = vec4<f16>(v);
    }
    workgroupBarrier();
}

@compute @workgroup_size(WG)
fn main(
    @builtin(local_invocation_index) li: u32,
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) grid: vec3<u32>,
) {
    let h = wg.x / HALVES;
    // The output dimensions this workgroup writes start at `od` (in runs of 4: `od4`).
    let od = (wg.x % HALVES) * MAX_HEAD_DIM;
    let od4 = od / 4u;
    let c = wg.z;
    let sg = li / 32u;
    let lane = li % 32u;
    let kv_dim = N_KV_HEADS * HEAD_DIM;
    let q_dim = N_HEADS * HEAD_DIM;
    let kvh = h / (N_HEADS / N_KV_HEADS);
    let tl = tiles[wg.y];
    let t0 = tl.x;
    let rows = tl.y;
    let info = tokens[t0];
    let first = info.pos;
    let last = first + rows - 1u;
    // The keys this chunk offers the tile: lo..hi.
    let lo = max(c * CHUNK, window_start(first));
    let hi = min(c * CHUNK + CHUNK, last + 1u);
    if (li == 0u) {
        shared_u = select(0u, (hi - lo + KEYS - 1u) / KEYS, hi > lo);
    }
    // Uniform for naga (a storage read is not), so the matrix units' loops and barriers are.
    let steps = workgroupUniformLoad(&shared_u);

    // This lane's row in the softmax: row `row` of its subgroup, keys half * 16.. of a step.
    let row = lane % 16u;
    let half = lane / 16u;
    let r = sg * 16u + row;
    let pos = first + r;
    let row_lo = max(c * CHUNK, window_start(pos));
    let row_hi = select(0u, min(c * CHUNK + CHUNK, pos + 1u), r < rows);

    // The queries' dimensions 0..128 through the tile into q0..q7, then 128..256 into q8..q15
    // (zeros for narrower heads, whose extra multiply-adds are skipped; likewise q4..q7 past 64).
    load_queries(li, t0, rows, h, 0u);
    let qo = sg * 16u * LDV;
    let q0 = coopLoadT<coop_mat16x16<f16, A>>(&tile[qo], LDV);
    let q1 = coopLoadT<coop_mat16x16<f16, A>>(&tile[qo + 4u], LDV);
    let q2 = coopLoadT<coop_mat16x16<f16, A>>(&tile[qo + 8u], LDV);
    let q3 = coopLoadT<coop_mat16x16<f16, A>>(&tile[qo + 12u], LDV);
    let q4 = coopLoadT<coop_mat16x16<f16, A>>(&tile[qo + 16u], LDV);
    let q5 = coopLoadT<coop_mat16x16<f16, A>>(&tile[qo + 20u], LDV);
    let q6 = coopLoadT<coop_mat16x16<f16, A>>(&tile[qo + 24u], LDV);
    let q7 = coopLoadT<coop_mat16x16<f16, A>>(&tile[qo + 28u], LDV);
    workgroupBarrier();
    load_queries(li, t0, rows, h, MAX_HEAD_DIM / 4u);
    let q8 = coopLoadT<coop_mat16x16<f16, A>>(&tile[qo], LDV);
    let q9 = coopLoadT<coop_mat16x16<f16, A>>(&tile[qo + 4u], LDV);
    let q10 = coopLoadT<coop_mat16x16<f16, A>>(&tile[qo + 8u], LDV);
    let q11 = coopLoadT<coop_mat16x16<f16, A>>(&tile[qo + 12u], LDV);
    let q12 = coopLoadT<coop_mat16x16<f16, A>>(&tile[qo + 16u], LDV);
    let q13 = coopLoadT<coop_mat16x16<f16, A>>(&tile[qo + 20u], LDV);
    let q14 = coopLoadT<coop_mat16x16<f16, A>>(&tile[qo + 24u], LDV);
    let q15 = coopLoadT<coop_mat16x16<f16, A>>(&tile[qo + 28u], LDV);
    var o0 = coop_mat16x16<f32, C>();
    var o1 = coop_mat16x16<f32, C>();
    var o2 = coop_mat16x16<f32, C>();
    var o3 = coop_mat16x16<f32, C>();
    var o4 = coop_mat16x16<f32, C>();
    var o5 = coop_mat16x16<f32, C>();
    var o6 = coop_mat16x16<f32, C>();
    var o7 = coop_mat16x16<f32, C>();

    let table_off = info.table_off;
    let head_off = kvh * HEAD_DIM / 4u;
    // The value dimensions this workgroup takes (in runs of 4).
    let vd4 = min(HEAD_DIM, MAX_HEAD_DIM) / 4u;
    let so = sg * 512u;
    let ss = 16u;
    let po = sg * 16u * (LDP / 4u);
    let wide = HEAD_DIM > 64u;
    let wider = HEAD_DIM > MAX_HEAD_DIM;
    var m = NEG_BIG;
    var l = 0.0;
    // Pass 1 (steps 0..steps): each row's maximum and sum. Pass 2: probabilities times values.
    for (var it = 0u; it < 2u * steps; it++) {
        if (li == 0u) {
            shared_u = u32(it >= steps);
        }
        // Also waits until the last step's readers of the tile are done.
        let second = workgroupUniformLoad(&shared_u) == 1u;
        let k0 = lo + (it % steps) * KEYS;
        // Keys past hi repeat the last (a valid row) and get probability 0.
        for (var e = li; e < KEYS * (HEAD_DIM / 4u); e += WG) {
            let key = e / (HEAD_DIM / 4u);
            let d4 = e % (HEAD_DIM / 4u);
            tile[key * LDK + d4] = halves(k_cache[cache_row(table_off, min(k0 + key, hi - 1u)) * (kv_dim / 4u) + head_off + d4]);
        }
        if (second) {
            // A lane takes 4 keys by 4 dimensions and stores them as 4 runs of 4 keys.
            for (var e = li; e < KEYS / 4u * vd4; e += WG) {
                let kq = e / vd4;
                let d4 = e % vd4;
                var v: array<vec4<f16>, 4>;
                for (var k = 0u; k < 4u; k++) {
                    v[k] = halves(v_cache[cache_row(table_off, min(k0 + 4u * kq + k, hi - 1u)) * (kv_dim / 4u) + head_off + od4 + d4]);
                }
                for (var j = 0u; j < 4u; j++) {
                    vt[(4u * d4 + j) * (LDP / 4u) + kq] = vec4<f16>(v[0][j], v[1][j], v[2][j], v[3][j]);
                }
            }
        }
        workgroupBarrier();
        // B[d][key] = K[key][d]: the keys read column-major.
        var s0 = coop_mat16x16<f32, C>();
        var s1 = coop_mat16x16<f32, C>();
        s0 = coopMultiplyAdd(q0, coopLoad<coop_mat16x16<f16, B>>(&tile[0u], LDK), s0);
        s1 = coopMultiplyAdd(q0, coopLoad<coop_mat16x16<f16, B>>(&tile[16u * LDK], LDK), s1);
        s0 = coopMultiplyAdd(q1, coopLoad<coop_mat16x16<f16, B>>(&tile[4u], LDK), s0);
        s1 = coopMultiplyAdd(q1, coopLoad<coop_mat16x16<f16, B>>(&tile[16u * LDK + 4u], LDK), s1);
        s0 = coopMultiplyAdd(q2, coopLoad<coop_mat16x16<f16, B>>(&tile[8u], LDK), s0);
        s1 = coopMultiplyAdd(q2, coopLoad<coop_mat16x16<f16, B>>(&tile[16u * LDK + 8u], LDK), s1);
        s0 = coopMultiplyAdd(q3, coopLoad<coop_mat16x16<f16, B>>(&tile[12u], LDK), s0);
        s1 = coopMultiplyAdd(q3, coopLoad<coop_mat16x16<f16, B>>(&tile[16u * LDK + 12u], LDK), s1);
        if (wide) {
            s0 = coopMultiplyAdd(q4, coopLoad<coop_mat16x16<f16, B>>(&tile[16u], LDK), s0);
            s1 = coopMultiplyAdd(q4, coopLoad<coop_mat16x16<f16, B>>(&tile[16u * LDK + 16u], LDK), s1);
            s0 = coopMultiplyAdd(q5, coopLoad<coop_mat16x16<f16, B>>(&tile[20u], LDK), s0);
            s1 = coopMultiplyAdd(q5, coopLoad<coop_mat16x16<f16, B>>(&tile[16u * LDK + 20u], LDK), s1);
            s0 = coopMultiplyAdd(q6, coopLoad<coop_mat16x16<f16, B>>(&tile[24u], LDK), s0);
            s1 = coopMultiplyAdd(q6, coopLoad<coop_mat16x16<f16, B>>(&tile[16u * LDK + 24u], LDK), s1);
            s0 = coopMultiplyAdd(q7, coopLoad<coop_mat16x16<f16, B>>(&tile[28u], LDK), s0);
            s1 = coopMultiplyAdd(q7, coopLoad<coop_mat16x16<f16, B>>(&tile[16u * LDK + 28u], LDK), s1);
        }
        if (wider) {
            s0 = coopMultiplyAdd(q8, coopLoad<coop_mat16x16<f16, B>>(&tile[32u], LDK), s0);
            s1 = coopMultiplyAdd(q8, coopLoad<coop_mat16x16<f16, B>>(&tile[16u * LDK + 32u], LDK), s1);
            s0 = coopMultiplyAdd(q9, coopLoad<coop_mat16x16<f16, B>>(&tile[36u], LDK), s0);
            s1 = coopMultiplyAdd(q9, coopLoad<coop_mat16x16<f16, B>>(&tile[16u * LDK + 36u], LDK), s1);
            s0 = coopMultiplyAdd(q10, coopLoad<coop_mat16x16<f16, B>>(&tile[40u], LDK), s0);
            s1 = coopMultiplyAdd(q10, coopLoad<coop_mat16x16<f16, B>>(&tile[16u * LDK + 40u], LDK), s1);
            s0 = coopMultiplyAdd(q11, coopLoad<coop_mat16x16<f16, B>>(&tile[44u], LDK), s0);
            s1 = coopMultiplyAdd(q11, coopLoad<coop_mat16x16<f16, B>>(&tile[16u * LDK + 44u], LDK), s1);
            s0 = coopMultiplyAdd(q12, coopLoad<coop_mat16x16<f16, B>>(&tile[48u], LDK), s0);
            s1 = coopMultiplyAdd(q12, coopLoad<coop_mat16x16<f16, B>>(&tile[16u * LDK + 48u], LDK), s1);
            s0 = coopMultiplyAdd(q13, coopLoad<coop_mat16x16<f16, B>>(&tile[52u], LDK), s0);
            s1 = coopMultiplyAdd(q13, coopLoad<coop_mat16x16<f16, B>>(&tile[16u * LDK + 52u], LDK), s1);
            s0 = coopMultiplyAdd(q14, coopLoad<coop_mat16x16<f16, B>>(&tile[56u], LDK), s0);
            s1 = coopMultiplyAdd(q14, coopLoad<coop_mat16x16<f16, B>>(&tile[16u * LDK + 56u], LDK), s1);
            s0 = coopMultiplyAdd(q15, coopLoad<coop_mat16x16<f16, B>>(&tile[60u], LDK), s0);
            s1 = coopMultiplyAdd(q15, coopLoad<coop_mat16x16<f16, B>>(&tile[16u * LDK + 60u], LDK), s1);
        }
        let so1 = so + 256u;
        coopStore(s0, &scores[so], ss);
        coopStore(s1, &scores[so1], ss);
        workgroupBarrier();

        var sv: array<f32, 16>;
        var mx = NEG_BIG;
        for (var i = 0u; i < 16u; i++) {
            let key = half * 16u + i;
            let j = k0 + key;
            sv[i] = select(NEG_BIG, scores[so + key * 16u + row], j >= row_lo && j < row_hi);
            mx = max(mx, sv[i]);
        }
        mx = max(mx, subgroupShuffleXor(mx, 16u));
        // In the second pass m is already the row's maximum.
        let mn = max(m, mx);
        var p: array<f32, 16>;
        var sum = 0.0;
        for (var i = 0u; i < 16u; i++) {
            p[i] = select(0.0, exp(sv[i] - mn), sv[i] > NEG_BIG);
            sum += p[i];
        }
        sum += subgroupShuffleXor(sum, 16u);
        if (second) {
            for (var i = 0u; i < 4u; i++) {
                probs[po + row * (LDP / 4u) + half * 4u + i] = vec4<f16>(vec4<f32>(p[4u * i], p[4u * i + 1u], p[4u * i + 2u], p[4u * i + 3u]));
            }
        } else {
            l = l * exp(m - mn) + sum;
            m = mn;
        }
        workgroupBarrier();
        if (second) {
            // O^T[d][row] += V^T[d][key] P^T[key][row]: B[key][row] = P[row][key], column-major.
            let pa = coopLoad<coop_mat16x16<f16, B>>(&probs[po], LDP / 4u);
            let pb = coopLoad<coop_mat16x16<f16, B>>(&probs[po + 4u], LDP / 4u);
            o0 = coopMultiplyAdd(coopLoadT<coop_mat16x16<f16, A>>(&vt[0u], LDP / 4u), pa, o0);
            o0 = coopMultiplyAdd(coopLoadT<coop_mat16x16<f16, A>>(&vt[4u], LDP / 4u), pb, o0);
            o1 = coopMultiplyAdd(coopLoadT<coop_mat16x16<f16, A>>(&vt[16u * (LDP / 4u)], LDP / 4u), pa, o1);
            o1 = coopMultiplyAdd(coopLoadT<coop_mat16x16<f16, A>>(&vt[16u * (LDP / 4u) + 4u], LDP / 4u), pb, o1);
            o2 = coopMultiplyAdd(coopLoadT<coop_mat16x16<f16, A>>(&vt[32u * (LDP / 4u)], LDP / 4u), pa, o2);
            o2 = coopMultiplyAdd(coopLoadT<coop_mat16x16<f16, A>>(&vt[32u * (LDP / 4u) + 4u], LDP / 4u), pb, o2);
            o3 = coopMultiplyAdd(coopLoadT<coop_mat16x16<f16, A>>(&vt[48u * (LDP / 4u)], LDP / 4u), pa, o3);
            o3 = coopMultiplyAdd(coopLoadT<coop_mat16x16<f16, A>>(&vt[48u * (LDP / 4u) + 4u], LDP / 4u), pb, o3);
            if (wide) {
                o4 = coopMultiplyAdd(coopLoadT<coop_mat16x16<f16, A>>(&vt[64u * (LDP / 4u)], LDP / 4u), pa, o4);
                o4 = coopMultiplyAdd(coopLoadT<coop_mat16x16<f16, A>>(&vt[64u * (LDP / 4u) + 4u], LDP / 4u), pb, o4);
                o5 = coopMultiplyAdd(coopLoadT<coop_mat16x16<f16, A>>(&vt[80u * (LDP / 4u)], LDP / 4u), pa, o5);
                o5 = coopMultiplyAdd(coopLoadT<coop_mat16x16<f16, A>>(&vt[80u * (LDP / 4u) + 4u], LDP / 4u), pb, o5);
                o6 = coopMultiplyAdd(coopLoadT<coop_mat16x16<f16, A>>(&vt[96u * (LDP / 4u)], LDP / 4u), pa, o6);
                o6 = coopMultiplyAdd(coopLoadT<coop_mat16x16<f16, A>>(&vt[96u * (LDP / 4u) + 4u], LDP / 4u), pb, o6);
                o7 = coopMultiplyAdd(coopLoadT<coop_mat16x16<f16, A>>(&vt[112u * (LDP / 4u)], LDP / 4u), pa, o7);
                o7 = coopMultiplyAdd(coopLoadT<coop_mat16x16<f16, A>>(&vt[112u * (LDP / 4u) + 4u], LDP / 4u), pb, o7);
            }
        }
    }

    // The chunk's state: each row's (max, sum), then its values 16 dimensions at a time.
    let direct = grid.z == 1u;
    let in_chunk = r < rows && pos >= c * CHUNK;
    if (half == 0u) {
        row_sum[r] = l;
        if (in_chunk && !direct) {
            let base = ((tokens[t0 + r].chunk_off + c) * N_HEADS + h) * (HEAD_DIM + 2u);
            partials[base] = m;
            partials[base + 1u] = l;
        }
    }
    coopStore(o0, &scores[so], ss);
    flush(sg, lane, od + 0u, h, t0, rows, first, c, direct);
    coopStore(o1, &scores[so], ss);
    flush(sg, lane, od + 16u, h, t0, rows, first, c, direct);
    coopStore(o2, &scores[so], ss);
    flush(sg, lane, od + 32u, h, t0, rows, first, c, direct);
    coopStore(o3, &scores[so], ss);
    flush(sg, lane, od + 48u, h, t0, rows, first, c, direct);
    if (wide) {
        coopStore(o4, &scores[so], ss);
        flush(sg, lane, od + 64u, h, t0, rows, first, c, direct);
        coopStore(o5, &scores[so], ss);
        flush(sg, lane, od + 80u, h, t0, rows, first, c, direct);
        coopStore(o6, &scores[so], ss);
        flush(sg, lane, od + 96u, h, t0, rows, first, c, direct);
        coopStore(o7, &scores[so], ss);
        flush(sg, lane, od + 112u, h, t0, rows, first, c, direct);
    }
}
