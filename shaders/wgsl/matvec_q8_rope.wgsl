// matvec_q8_rope: the Q/K/V matvec of a decode step doing rope_kv.wgsl's work as well, for
// layouts whose rotated pairs are adjacent elements (2i, 2i + 1: GGUF's Llama). The two rows of a
// pair end in one workgroup (one lane group, with ROWS even), whose first lane of the even row rotates them: Q into y, K into the
// paged cache; V's pairs go to the cache as they are. K and V are not stored in y, since
// attention reads them from the cache. The engine builds it only where every workgroup covers an
// even number of rows and every weight part starts on an even column (`MatmulOp::rotate`). Not
// in deterministic mode: a driver may contract the rotation's products differently here than in
// rope_kv.wgsl.

override N_HEADS: u32;
override N_KV_HEADS: u32;
override HEAD_DIM: u32;
override KV_F16: bool = true;

@group(0) @binding(7) var<storage, read> tokens: array<TokenInfo>;
// cos/sin per (position, pair), as rope_kv.wgsl reads them.
@group(0) @binding(8) var<storage, read> rope: array<vec2<f32>>;
// The K/V cache as words: two halves a word (kv_f16.wgsl's layout) or one f32 each.
@group(0) @binding(9) var<storage, read_write> k_words: array<u32>;
@group(0) @binding(10) var<storage, read_write> v_words: array<u32>;

var<workgroup> row_sums: array<f32, MAX_GROUPS * MAX_TILE>;

// Values e and e + 1 (e even) of the K (or V) cache.
fn cache_pair(k: bool, e: u32, v: vec2<f32>) {
    if (KV_F16) {
        let w = pack2x16float(v);
        if (k) {
            k_words[e / 2u] = w;
        } else {
            v_words[e / 2u] = w;
        }
    } else if (k) {
        k_words[e] = bitcast<u32>(v.x);
        k_words[e + 1u] = bitcast<u32>(v.y);
    } else {
        v_words[e] = bitcast<u32>(v.x);
        v_words[e + 1u] = bitcast<u32>(v.y);
    }
}

// Token t's values of rows row (even) and row + 1: rotated into y (Q) or the cache (K), or
// cached as they are (V).
fn rotate_pair(row: u32, t: u32, x0: f32, x1: f32) {
    let col = p.y_offset + row;
    let q_dim = N_HEADS * HEAD_DIM;
    let kv_dim = N_KV_HEADS * HEAD_DIM;
    let info = tokens[t];
    if (col >= q_dim + kv_dim) {
        cache_pair(false, info.slot * kv_dim + col - q_dim - kv_dim, vec2<f32>(x0, x1));
        return;
    }
    let cs = rope[info.pos * (HEAD_DIM / 2u) + (col % HEAD_DIM) / 2u];
    let r0 = x0 * cs.x - x1 * cs.y;
    let r1 = x0 * cs.y + x1 * cs.x;
    if (col < q_dim) {
        store_y(t, row, r0);
        store_y(t, row + 1u, r1);
    } else {
        cache_pair(true, info.slot * kv_dim + col - q_dim, vec2<f32>(r0, r1));
    }
}

// Rows set * ROWS.. of the set.
fn weight_row(rows_set: u32, r: u32) -> u32 {
    return rows_set * ROWS + r;
}

// With ROWS even a pair's two rows are one lane group's; with ROWS = 1 they are two groups' of
// one workgroup, met in workgroup memory.
fn finish_rows(acc: ptr<function, array<f32, MAX_TILE>>, li: u32, rows_set: u32, t0: u32, n_tok: u32) {
    let row0 = rows_set * ROWS;
    if (ROWS == 1u) {
        let local = li / (SPLIT * KSPLIT);
        if (li % (SPLIT * KSPLIT) == 0u) {
            for (var t = 0u; t < TOKENS; t++) {
                row_sums[local * MAX_TILE + t] = (*acc)[t];
            }
        }
        workgroupBarrier();
        if (li % (SPLIT * KSPLIT) != 0u || local % 2u != 0u || row0 >= p.n) {
            return;
        }
        for (var t = 0u; t < TOKENS; t++) {
            if (t0 + t < n_tok) {
                rotate_pair(row0, t0 + t, row_sums[local * MAX_TILE + t], row_sums[(local + 1u) * MAX_TILE + t]);
            }
        }
        return;
    }
    if (li % (SPLIT * KSPLIT) != 0u) {
        return;
    }
    for (var r = 0u; r < ROWS; r += 2u) {
        for (var t = 0u; t < TOKENS; t++) {
            if (row0 + r < p.n && t0 + t < n_tok) {
                rotate_pair(row0 + r, t0 + t, (*acc)[r * TOKENS + t], (*acc)[(r + 1u) * TOKENS + t]);
            }
        }
    }
}
