// matvec_q8_glu: the gate/up matvec of a one-token step doing silu_mul.wgsl's work as well. A
// lane group's ROWS rows are ROWS / 2 gate rows and the up rows of the same units (the matrix is
// the gates' FFN_DIM rows, then the ups'), so the lane that ends with their sums has both halves
// of its units; a workgroup's groups cover 32 consecutive units, one block of the down
// projection's 8-bit input, which its first 8 lanes quantize and write (q8_lanes.wgsl) as
// silu_mul.wgsl would, with the f32 activations into the gate half of y. One token (TOKENS is 1),
// (WG / SPLIT / KSPLIT) * ROWS / 2 = 32, FFN_DIM a multiple of 32: `MatmulOp::take_glu` in core
// builds it only then. Its sums leave through `finish_rows`, not `store_y` alone.

override FFN_DIM: u32;
// GeGLU with GELU's tanh form (Gemma) instead of SiLU, as silu_mul.wgsl.
override GELU: bool = false;

@group(0) @binding(7) var<storage, read_write> out_q8: array<u32>;

var<workgroup> glu_units: array<f32, 32>;

// Row r of a set: its units' gates, then their ups.
fn weight_row(rows_set: u32, r: u32) -> u32 {
    let half = max(ROWS / 2u, 1u);
    let unit = rows_set * half + r % half;
    return select(unit, FFN_DIM + unit, r >= half);
}

fn gated(g: f32, u: f32) -> f32 {
    if (GELU) {
        return g / (1.0 + exp(-2.0 * 0.7978845608 * (g + 0.044715 * g * g * g))) * u;
    }
    return g / (1.0 + exp(-g)) * u;
}

fn finish_rows(acc: ptr<function, array<f32, MAX_TILE>>, li: u32, rows_set: u32, t0: u32, n_tok: u32) {
    let half = max(ROWS / 2u, 1u);
    let local = li / (SPLIT * KSPLIT);
    if (li % (SPLIT * KSPLIT) == 0u) {
        for (var r = 0u; r < half; r++) {
            glu_units[local * half + r] = gated((*acc)[r], (*acc)[half + r]);
        }
    }
    workgroupBarrier();
    // The workgroup's 32 units, 4 a lane on lanes 0-7 (q8_lanes' block), zeros elsewhere.
    let unit0 = (rows_set - local) * half;
    var v = vec4<f32>(0.0);
    if (li < 8u) {
        v = vec4<f32>(glu_units[4u * li], glu_units[4u * li + 1u], glu_units[4u * li + 2u], glu_units[4u * li + 3u]);
    }
    let q = q8_lanes(li, v);
    let unit = unit0 + 4u * li;
    if (li < 8u && t0 < n_tok && unit < FFN_DIM) {
        for (var k = 0u; k < 4u; k++) {
            store_y(t0, unit + k, v[k]);
        }
        q8_store_word(2u * FFN_DIM, t0, unit / 4u, q);
    }
}
