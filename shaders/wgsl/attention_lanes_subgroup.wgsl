// Attention's lane exchange through subgroup operations: chosen only where every subgroup is
// exactly 32 lanes, so the workgroup is one subgroup and needs no barriers.

var<private> published_p: f32;
var<private> published_row: u32;

/// The largest of the 32 lanes' `v`.
fn lanes_max(v: f32, lane: u32) -> f32 {
    return subgroupMax(v);
}

/// Makes each lane's probability and value row readable by every lane (`lane_prob`, `lane_row`).
fn lanes_publish(p: f32, row: u32, lane: u32) {
    published_p = p;
    published_row = row;
}

/// The sum of the published probabilities.
fn published_sum() -> f32 {
    return subgroupAdd(published_p);
}

fn lane_prob(i: u32) -> f32 {
    return subgroupShuffle(published_p, i);
}

fn lane_row(i: u32) -> u32 {
    return subgroupShuffle(published_row, i);
}

fn lanes_release() {}
