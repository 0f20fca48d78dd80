// Quantizes activations to 8 bits (common.wgsl) in parallel: each lane holds 4 consecutive
// values, one quant word, and lanes 8k..8k+7 of a workgroup hold block k in order (a lane that
// quantized a whole block alone cost the small models' decode steps 10-20%). The block's max and
// sum of quants (`block_max`, `block_sum`: exact, so either way gives the same bits) come from
// q8_block_subgroup.wgsl (32-lane subgroups: shuffles, no barrier) or q8_block_workgroup.wgsl
// (workgroup memory, two barriers). Call from uniform control flow with every lane of a
// workgroup of at most Q8_LANES lanes; lanes outside the data pass zeros.

const Q8_LANES: u32 = 256u;

struct Q8Word {
    // The lane's 4 quants, packed.
    word: u32,
    // The block's scale and d * sum of its quants.
    d: f32,
    s: f32,
}

fn q8_lanes(li: u32, v: vec4<f32>) -> Q8Word {
    let a = abs(v);
    let amax = block_max(li, max(max(a.x, a.y), max(a.z, a.w)));
    let d = amax / 127.0;
    let inv = select(0.0, 1.0 / d, amax > 0.0);
    let q = vec4<i32>(round(v * inv));
    let sum = block_sum(li, q.x + q.y + q.z + q.w);
    return Q8Word(pack4xI8(q), d, d * f32(sum));
}
