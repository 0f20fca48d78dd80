// Attention's lane exchange through workgroup memory, for adapters without 32-lane subgroups.
// Every lane folds the 32 values in lane order, so all lanes get bit-identical results.

var<workgroup> probs: array<f32, WG>;
var<workgroup> rows: array<u32, WG>;

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

/// Makes each lane's probability and value row readable by every lane (`lane_prob`, `lane_row`)
/// until `lanes_release`.
fn lanes_publish(p: f32, row: u32, lane: u32) {
    probs[lane] = p;
    rows[lane] = row;
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

fn lane_row(i: u32) -> u32 {
    return rows[i];
}

fn lanes_release() {
    workgroupBarrier();
}
