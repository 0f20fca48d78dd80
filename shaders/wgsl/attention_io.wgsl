// What the two attention kernels (attention.wgsl, attention_coop.wgsl) share: the model's head
// shape, the step's queries, tokens and block tables, where a chunk's state or the output goes,
// and how a position is found in the paged cache. Bindings 4 and 5, the cache, come with its
// format (kv_*.wgsl); binding 8 is each kernel's own.

override N_HEADS: u32;
override N_KV_HEADS: u32;
override HEAD_DIM: u32;
override BLOCK_TOKENS: u32;
override SCALE: f32;
// Sliding-window layers: the query at position p sees only positions p - WINDOW + 1..=p (llama.cpp's
// standard window); 0 sees the whole prefix. A chunk wholly before the window leaves an empty state.
override WINDOW: u32 = 0u;

const NEG_BIG: f32 = -3.0e38;

@group(0) @binding(0) var<uniform> step: Step;
@group(0) @binding(1) var<storage, read> qkv: array<f32>;
@group(0) @binding(2) var<storage, read> tokens: array<TokenInfo>;
@group(0) @binding(3) var<storage, read> tables: array<u32>;
// Per (chunk of the step, head): [max, sum, HEAD_DIM weighted values], packed by the tokens'
// `chunk_off`.
@group(0) @binding(6) var<storage, read_write> partials: array<f32>;
// `[tokens][N_HEADS * HEAD_DIM]`, written when the step has one chunk per token.
@group(0) @binding(7) var<storage, read_write> out: array<f32>;

// The cache row of position `j` of the sequence whose block table starts at `table_off`.
fn cache_row(table_off: u32, j: u32) -> u32 {
    return tables[table_off + j / BLOCK_TOKENS] * BLOCK_TOKENS + j % BLOCK_TOKENS;
}

// The first position the query at position p sees.
fn window_start(p: u32) -> u32 {
    if (WINDOW > 0u && p + 1u > WINDOW) {
        return p + 1u - WINDOW;
    }
    return 0u;
}
