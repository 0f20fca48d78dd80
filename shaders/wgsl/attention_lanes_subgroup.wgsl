// Attention's lane exchange through subgroup operations: chosen only where every subgroup is
// exactly 32 lanes, so the workgroup is one subgroup and needs no barriers.

var<private> published_p: f32;

/// The largest of the 32 lanes' `v`.
fn lanes_max(v: f32, lane: u32) -> f32 {
    return subgroupMax(v);
}

/// Makes each lane's probability readable by every lane (`lane_prob`).
fn lanes_publish(p: f32, lane: u32) {
    published_p = p;
}

/// The sum of the published probabilities.
fn published_sum() -> f32 {
    return subgroupAdd(published_p);
}

fn lane_prob(i: u32) -> f32 {
    return subgroupShuffle(published_p, i);
}

fn lanes_release() {}
