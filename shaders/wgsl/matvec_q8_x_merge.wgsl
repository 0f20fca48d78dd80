// matvec_q8.wgsl's activations merged here from attention.wgsl's per-chunk softmax states: the
// values attention_merge.wgsl would have written (its arithmetic, in chunk order), quantized to
// 8 bits (q8_lanes.wgsl) into workgroup memory. A decode step whose tokens attend over more than
// one chunk records the merge's dispatch between attention and the output projection; here every
// workgroup of the projection redoes the merge (chunks x heads x (HEAD_DIM + 2) floats, from
// cache) and the step saves that dispatch. One token a workgroup (TOKENS is 1), rows of whole
// blocks up to MAX_X_BLOCKS long (`MERGING_MAX_COLS` in core); `MatmulOp::take_merge` builds it
// only then, and `takes_merging_matvec` bounds the chunks.

override N_HEADS: u32;
override HEAD_DIM: u32;
override CHUNK: u32;
const MAX_X_BLOCKS: u32 = 32u;

// The chunks' states ((max, sum, weighted values) per chunk and head, packed by the tokens'
// chunk_off) and the step's tokens.
@group(0) @binding(2) var<storage, read> partials: array<f32>;
@group(0) @binding(6) var<storage, read> tokens: array<TokenInfo>;

var<workgroup> x_words: array<u32, MAX_X_BLOCKS * 8u>;
var<workgroup> x_ds: array<vec2<f32>, MAX_X_BLOCKS>;

struct XBlock {
    lo: vec4<u32>,
    hi: vec4<u32>,
    ds: vec2<f32>,
}

// Called by every lane, in uniform control flow: each lane merges runs of 4 dimensions of one
// head, lanes 8k..8k+7 a block (q8_lanes' contract), as many passes over the row as it takes.
fn x_prepare(li: u32, t0: u32) {
    let k = p.k;
    let info = tokens[t0];
    let chunks = (info.pos + CHUNK) / CHUNK;
    let stride = N_HEADS * (HEAD_DIM + 2u);
    for (var w0 = 0u; 4u * w0 < k; w0 += WG) {
        let w = w0 + li;
        let c = 4u * w;
        var v = vec4<f32>(0.0);
        if (c < k) {
            let h = c / HEAD_DIM;
            let d = c % HEAD_DIM;
            let base = (info.chunk_off * N_HEADS + h) * (HEAD_DIM + 2u);
            var big = -3.0e38;
            var total = 0.0;
            var acc = vec4<f32>(0.0);
            for (var ch = 0u; ch < chunks; ch++) {
                let o = base + ch * stride;
                let m = partials[o];
                let next = max(big, m);
                let was = exp(big - next);
                let now = exp(m - next);
                total = total * was + partials[o + 1u] * now;
                let s = vec4<f32>(partials[o + 2u + d], partials[o + 3u + d], partials[o + 4u + d], partials[o + 5u + d]);
                acc = acc * was + s * now;
                big = next;
            }
            v = acc / total;
        }
        let q = q8_lanes(li, v);
        if (c < k) {
            x_words[w] = q.word;
            if (w % 8u == 0u) {
                x_ds[w / 8u] = vec2<f32>(q.d, q.s);
            }
        }
    }
    workgroupBarrier();
}

fn x_block(t: u32, b: u32, xbs: u32) -> XBlock {
    let w = 8u * b;
    return XBlock(
        vec4<u32>(x_words[w], x_words[w + 1u], x_words[w + 2u], x_words[w + 3u]),
        vec4<u32>(x_words[w + 4u], x_words[w + 5u], x_words[w + 6u], x_words[w + 7u]),
        x_ds[b],
    );
}
