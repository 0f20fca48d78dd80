// y[t, off + n] (+)= sum_k x[t, k] * W[n, k] for the few tokens of a decode step, with x as 8-bit
// activations (common.wgsl, written by the kernel that produced x through q8_lanes.wgsl) and the weights'
// own integers: four multiply-adds an instruction (`dot4I8Packed`), no nibble-to-float work, and a
// quarter of the activation bytes of matvec.wgsl. What llama.cpp's mmvq does; measured 2-4x the
// f32 matvec on the H200's large matrices (docs/kernel-notes.md, item 16).
//
// A group of SPLIT = 32 lanes walks one row, each lane a whole block at a time (the format's
// `q8_weights` and `q8_dot`): the warp's weight loads are one contiguous run. KSPLIT lane groups
// of a workgroup share a row, each taking every KSPLIT-th run of 32 blocks. Sums are combined as
// in matvec.wgsl. Formats with a packed-byte dot only (Q4_0, Q4_1, Q8_0); rows of whole blocks.
// Not batch-invariant (the activations are rounded, and a token's sums depend on TOKENS);
// deterministic mode never uses it.

override TOKENS: u32 = 1u;
// Runs of 32 blocks each lane loads before computing.
override UNROLL: u32 = 4u;
override KSPLIT: u32 = 1u;
override SPLIT: u32 = 32u;
override WG: u32 = 64u;

const MAX_TILE: u32 = 8u;
const MAX_GROUPS: u32 = 8u;

// Token t's block b: quants at xq[2 * (t * x_stride / 32 + b)] and the next, (d, s) at
// xd[t * x_stride / 32 + b] (the two ranges of one buffer, bound apart).
@group(0) @binding(2) var<storage, read> xq: array<vec4<u32>>;
@group(0) @binding(6) var<storage, read> xd: array<vec2<f32>>;

var<workgroup> group_sums: array<f32, MAX_GROUPS * MAX_TILE>;

@compute @workgroup_size(WG)
fn main(@builtin(local_invocation_index) li: u32, @builtin(workgroup_id) wg: vec3<u32>) {
    let lane = li % SPLIT;
    let group = li / SPLIT;
    let kpart = group % KSPLIT;
    let row = wg.x * (WG / SPLIT / KSPLIT) + group / KSPLIT;
    let r = min(row, p.n - 1u);
    let n_tok = step_rows();
    let t0 = wg.y * TOKENS;
    let nb = p.k / 32u;
    let xbs = p.x_stride / 32u;

    var acc: array<f32, MAX_TILE>;
    let run = KSPLIT * SPLIT;
    // Tokens past the step's count read stale blocks (Q8_TOKENS are always allocated) and are
    // never written, so the loops keep constant bounds. Blocks past the row read the last one and
    // count 0.
    for (var b0 = kpart * SPLIT + lane; b0 < nb; b0 += UNROLL * run) {
        for (var u = 0u; u < UNROLL; u++) {
            let b = b0 + u * run;
            let bb = min(b, nb - 1u);
            let wb = q8_weights(r, bb, nb);
            for (var t = 0u; t < TOKENS; t++) {
                let o = (t0 + t) * xbs + bb;
                acc[t] += select(0.0, q8_dot(wb, xq[2u * o], xq[2u * o + 1u], xd[o]), b < nb);
            }
        }
    }

    sum_row_lanes(&acc, li, lane, TOKENS);

    if (KSPLIT > 1u) {
        if (lane == 0u) {
            for (var t = 0u; t < TOKENS; t++) {
                group_sums[group * MAX_TILE + t] = acc[t];
            }
        }
        workgroupBarrier();
        if (lane == 0u && kpart == 0u) {
            for (var t = 0u; t < TOKENS; t++) {
                var total = 0.0;
                for (var g = 0u; g < KSPLIT; g++) {
                    total += group_sums[(group + g) * MAX_TILE + t];
                }
                acc[t] = total;
            }
        }
    }

    if (lane == 0u && kpart == 0u && row < p.n) {
        for (var t = 0u; t < TOKENS; t++) {
            if (t0 + t < n_tok) {
                store_y(t0 + t, row, acc[t]);
            }
        }
    }
}
