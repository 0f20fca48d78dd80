// y[t, off + n] (+)= sum_k x[t, k] * W[n, k] for the few tokens of a decode step, with x as 8-bit
// activations (common.wgsl, written by the kernel that produced x through q8_lanes.wgsl) and the weights'
// own integers: four multiply-adds an instruction (`dot4I8Packed`), no nibble-to-float work, and a
// quarter of the activation bytes of matvec.wgsl. What llama.cpp's mmvq does; measured 2-4x the
// f32 matvec on the H200's large matrices (docs/kernel-notes.md, item 16).
//
// A group of SPLIT = 32 lanes walks ROWS rows, each lane a whole block at a time (the format's
// `q8_weights` and `q8_dot`): the warp's weight loads are contiguous runs, and each token's
// activation block, loaded once, serves all ROWS rows (on steps of several tokens those loads,
// not the weights', are what a lane spends its time on). KSPLIT lane groups
// of a workgroup share a row, each taking every KSPLIT-th run of 32 blocks (matvec_groups.wgsl
// combines the sums). Formats with a packed-byte dot only (Q4_0, Q4_1, Q8_0); rows of whole blocks.
//
// The grid's x is the step's groups of TOKENS tokens and its y the sets of rows, so the
// workgroups that read one set of rows for different tokens are dispatched side by side and find
// its weights in the L2: with rows along x, every group of tokens walked the whole matrix after
// the last, and a matrix larger than the L2 came from memory once a group.
// Not batch-invariant (the activations are rounded, and a token's sums depend on TOKENS);
// deterministic mode never uses it.

// Tokens per weight load and rows per lane group; ROWS * TOKENS <= MAX_TILE.
override TOKENS: u32 = 1u;
override ROWS: u32 = 1u;
const MAX_ROWS: u32 = 8u;
// Runs of 32 blocks each lane loads before computing.
override UNROLL: u32 = 4u;

// The activations come from matvec_q8_x.wgsl (as their producer wrote them),
// matvec_q8_x_norm.wgsl (normed and quantized here, the norm's dispatch saved) or
// matvec_q8_x_merge.wgsl (attention's chunks merged here, the merge's dispatch saved):
// `x_prepare`, then `x_block` per block.

// One token's block of 8-bit activations: its two halves' quants and (d, s).
struct XBlock {
    lo: vec4<u32>,
    hi: vec4<u32>,
    ds: vec2<f32>,
}

// The dot product of 16 signed bytes with 16 others, four at a time.
fn dot_i8x16(a: vec4<u32>, b: vec4<u32>) -> i32 {
    return dot4I8Packed(a.x, b.x) + dot4I8Packed(a.y, b.y) + dot4I8Packed(a.z, b.z) + dot4I8Packed(a.w, b.w);
}

// A block of 4-bit quants laid out as GGUF's Q4_0 and Q4_1 (byte j: element j in its low nibble,
// j + 16 in its high one) dotted with a block of 8-bit activations, x0 and x1 its two halves.
fn dot_nibbles_i8(q: vec4<u32>, x0: vec4<u32>, x1: vec4<u32>) -> i32 {
    let m = vec4<u32>(0x0f0f0f0fu);
    return dot_i8x16(q & m, x0) + dot_i8x16((q >> vec4<u32>(4u)) & m, x1);
}

@compute @workgroup_size(WG)
fn main(@builtin(local_invocation_index) li: u32, @builtin(workgroup_id) wg: vec3<u32>) {
    let lane = li % SPLIT;
    let group = li / SPLIT;
    let kpart = group % KSPLIT;
    // The lane group's set of ROWS rows (`weight_row` of the finish module says which).
    let rows_set = wg.y * (WG / SPLIT / KSPLIT) + group / KSPLIT;
    let last_row = p.n - 1u;
    let n_tok = step_rows();
    let t0 = wg.x * TOKENS;
    let nb = p.k / 32u;
    let xbs = p.x_stride / 32u;

    x_prepare(li, t0);
    var acc: array<f32, MAX_TILE>;
    let run = KSPLIT * SPLIT;
    // Tokens past the step's count read stale blocks (Q8_TOKENS are always allocated) and are
    // never written, so the loops keep constant bounds. Blocks past the row read the last one and
    // count 0.
    for (var b0 = kpart * SPLIT + lane; b0 < nb; b0 += UNROLL * run) {
        for (var u = 0u; u < UNROLL; u++) {
            let b = b0 + u * run;
            let bb = min(b, nb - 1u);
            var wb: array<WeightBlock, MAX_ROWS>;
            for (var r = 0u; r < ROWS; r++) {
                wb[r] = q8_weights(min(weight_row(rows_set, r), last_row), bb, nb);
            }
            for (var t = 0u; t < TOKENS; t++) {
                let xb = x_block(t0 + t, bb, xbs);
                for (var r = 0u; r < ROWS; r++) {
                    acc[r * TOKENS + t] += select(0.0, q8_dot(wb[r], xb.lo, xb.hi, xb.ds), b < nb);
                }
            }
        }
    }

    sum_row_groups(&acc, li, ROWS * TOKENS);
    // matvec_q8_store.wgsl, matvec_q8_rope.wgsl's rotation and cache write, or matvec_q8_glu.wgsl's
    // gated activation.
    finish_rows(&acc, li, rows_set, t0, n_tok);
}
