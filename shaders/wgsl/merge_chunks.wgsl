// attention.wgsl's per-chunk softmax states combined in chunk order: out = sum_c exp(m_c - M)
// acc_c / sum_c exp(m_c - M) l_c, M the running maximum, in one pass (every load's address known
// up front, so the loads overlap; three passes of dependent sums cost ~25 µs at 32 chunks on the
// H200). Shared by attention_merge.wgsl and matvec_q8_x_merge.wgsl, so the two give the same
// values. Each kernel binds `partials`.

// Dimensions d..d + 3 of the merged output of the head whose first chunk's state starts at
// `base`, over `chunks` chunks `stride` floats apart.
fn merge_run(base: u32, stride: u32, chunks: u32, d: u32) -> vec4<f32> {
    var big = -3.0e38;
    var total = 0.0;
    var acc = vec4<f32>(0.0);
    for (var c = 0u; c < chunks; c++) {
        let o = base + c * stride;
        let m = partials[o];
        let next = max(big, m);
        let was = exp(big - next);
        let now = exp(m - next);
        total = total * was + partials[o + 1u] * now;
        let v = vec4<f32>(partials[o + 2u + d], partials[o + 3u + d], partials[o + 4u + d], partials[o + 5u + d]);
        acc = acc * was + v * now;
        big = next;
    }
    return acc / total;
}
