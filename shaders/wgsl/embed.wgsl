// Embedding gather: x[t] = dequant(row id[t] of the token table). A table larger than one
// storage binding is split into row ranges; each part writes only the tokens it holds.

struct EmbedParams {
    row_start: u32,
    row_count: u32,
    dim: u32,
    _pad: u32,
}

@group(0) @binding(0) var<uniform> step: Step;
@group(0) @binding(1) var<uniform> p: EmbedParams;
@group(0) @binding(2) var<storage, read> tokens: array<TokenInfo>;
// Binding 3, the weight words `w`, is declared by the format's dequantization module.
@group(0) @binding(4) var<storage, read> s: array<u32>;
@group(0) @binding(5) var<storage, read_write> x: array<f32>;
// The ids sampled by the step before, for tokens whose id has FROM_SAMPLED set: decoding
// several steps back to back keeps each next id on the GPU.
@group(0) @binding(6) var<storage, read> sampled: array<u32>;

const FROM_SAMPLED: u32 = 0x80000000u;
// Gemma scales its embeddings by sqrt(hidden size).
override SCALE: f32 = 1.0;

// The dequantization modules also define dot products over activations; the gather has none.
fn x4(o: u32) -> vec4<f32> {
    return vec4<f32>(0.0);
}

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let col = gid.x;
    let t = gid.y;
    if (t >= step.n_tokens || col >= p.dim) {
        return;
    }
    var id = tokens[t].id;
    if ((id & FROM_SAMPLED) != 0u) {
        id = sampled[id & ~FROM_SAMPLED];
    }
    if (id < p.row_start || id >= p.row_start + p.row_count) {
        return;
    }
    x[t * p.dim + col] = dq_elem(id - p.row_start, col, p.dim) * SCALE;
}
