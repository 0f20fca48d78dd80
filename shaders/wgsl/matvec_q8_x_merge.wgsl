// matvec_q8.wgsl's activations merged here from attention.wgsl's per-chunk softmax states: the
// values attention_merge.wgsl would have written (merge_chunks.wgsl), staged as 8-bit
// activations in workgroup memory (matvec_q8_x_staged.wgsl). A decode step whose tokens attend over more than
// one chunk records the merge's dispatch between attention and the output projection; here every
// workgroup of the projection redoes the merge (chunks x heads x (HEAD_DIM + 2) floats, from
// cache) and the step saves that dispatch. One token a workgroup (TOKENS is 1);
// `MatmulOp::take_merge` in core builds it for rows up to `MERGING_MAX_COLS`, and
// `takes_merging_matvec` bounds the chunks.

override N_HEADS: u32;
override HEAD_DIM: u32;
override CHUNK: u32;

// The chunks' states ((max, sum, weighted values) per chunk and head, packed by the tokens'
// chunk_off) and the step's tokens.
@group(0) @binding(2) var<storage, read> partials: array<f32>;
@group(0) @binding(6) var<storage, read> tokens: array<TokenInfo>;

// Called by every lane, in uniform control flow: each lane merges runs of 4 dimensions of one
// head, as many passes over the row as it takes.
fn x_prepare(li: u32, t0: u32) {
    let k = p.k;
    let info = tokens[t0];
    let chunks = (info.pos + CHUNK) / CHUNK;
    for (var w0 = 0u; 4u * w0 < k; w0 += WG) {
        let w = w0 + li;
        let c = 4u * w;
        var v = vec4<f32>(0.0);
        if (c < k) {
            let base = (info.chunk_off * N_HEADS + c / HEAD_DIM) * (HEAD_DIM + 2u);
            v = merge_run(base, N_HEADS * (HEAD_DIM + 2u), chunks, c % HEAD_DIM);
        }
        x_stage(li, w, k, v);
    }
    workgroupBarrier();
}
