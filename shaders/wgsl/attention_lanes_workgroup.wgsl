// Attention's lane exchange through workgroup memory, for adapters without 32-lane subgroups.
// Every lane folds the 32 values in lane order, so all lanes get bit-identical results.

var<workgroup> probs: array<f32, WG>;

/// The largest of the 32 lanes' `v`.
fn lanes_max(v: f32, lane: u32) -> f32 {
    probs[lane] = v;
    workgroupBarrier();
    var m = probs[0];
    for (var i = 1u; i < WG; i++) {
        m = max(m, probs[i]);
    }
    workgroupBarrier();
    return m;
}

/// Makes each lane's probability readable by every lane (`lane_prob`) until `lanes_release`.
fn lanes_publish(p: f32, lane: u32) {
    probs[lane] = p;
    workgroupBarrier();
}

/// The sum of the published probabilities.
fn published_sum() -> f32 {
    var sum = 0.0;
    for (var i = 0u; i < WG; i++) {
        sum += probs[i];
    }
    return sum;
}

fn lane_prob(i: u32) -> f32 {
    return probs[i];
}

fn lanes_release() {
    workgroupBarrier();
}
