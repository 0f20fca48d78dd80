// Declarations shared by every kernel: the per-step header and the per-token record.
// Both are written once per engine step by the CPU; everything else a kernel needs is either a
// pipeline-overridable constant (model shape) or a small uniform built once at load time.

struct Step {
    // Tokens processed in this step (prefill chunks and decode tokens of all sequences).
    n_tokens: u32,
    // Rows that get logits and a sampled token (one per sequence that samples this step).
    n_sample: u32,
    _pad0: u32,
    _pad1: u32,
}

struct TokenInfo {
    id: u32,
    // Position of the token in its sequence.
    pos: u32,
    // Physical KV row (block * BLOCK_TOKENS + offset) the token's K/V is written to.
    slot: u32,
    // Offset of the sequence's block table in the block-table buffer.
    table_off: u32,
    // First of this token's attention chunks in the step's partials: the tokens before it have
    // ceil((pos + 1) / CHUNK) chunks each.
    chunk_off: u32,
}

// Small unsigned integers (below 2^23) as floats minus `bias`, in one bitwise OR and one
// subtraction instead of a conversion and a subtraction: OR-ed into the mantissa of 2^23 they are
// the float 2^23 + v exactly, and subtracting 2^23 + bias is exact. On the H200 it measured the
// same as the conversions (docs/kernel-notes.md, item 14): they were not what bounds the matvec.
fn small_uints_to_f32(v: vec4<u32>, bias: f32) -> vec4<f32> {
    return bitcast<vec4<f32>>(v | vec4<u32>(0x4b000000u)) - vec4<f32>(8388608.0 + bias);
}

// 8-bit activations for the decode matvecs (matvec_q8.wgsl), as llama.cpp's q8_1: per block of
// 32 values, signed bytes q = round(v / d) with d = max|v| / 127, and s = d * sum(q). The kernels
// that produce a matvec's input (the norms, SiLU·mul, the attention merge) also write it this way
// on steps of at most Q8_TOKENS rows, the ones that take the matvec (`q8_lanes`,
// q8_lanes.wgsl). Layout, for inputs of
// `stride` floats a token: the quants of token t, block b at bytes (t * stride / 32 + b) * 32,
// for Q8_TOKENS tokens; then (d, s) as two f32 at byte Q8_TOKENS * stride + (t * stride / 32 + b)
// * 8. Steps of up to Q8_TOKENS tokens take the matvec, in groups of its largest shape's tokens.
const Q8_TOKENS: u32 = 32u;

// Where word j of token t's block b goes, for inputs `stride` floats wide: j < 8 the quants'
// words, 8 the scale d, 9 the sum s.
fn q8_index(stride: u32, t: u32, b: u32, j: u32) -> u32 {
    let blk = t * (stride / 32u) + b;
    if (j < 8u) {
        return blk * 8u + j;
    }
    return Q8_TOKENS / 4u * stride + blk * 2u + j - 8u;
}
