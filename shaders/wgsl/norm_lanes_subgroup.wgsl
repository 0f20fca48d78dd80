// rmsnorm's sum over its WG lanes where every subgroup is exactly 32 lanes: each subgroup's sum
// by subgroupAdd, then the WG / 32 sums in subgroup order through workgroup memory; one barrier
// where the tree takes log2(WG). A decode step's norm is one workgroup on the critical path, so
// its barriers are its latency.

// Sized for the largest workgroup (naga 30 panics on an override-sized one here).
var<workgroup> red: array<f32, 32>;

// The sum of every lane's `v`, in an order fixed by the adapter.
fn sum_lanes(lane: u32, v: f32) -> f32 {
    let s = subgroupAdd(v);
    if (lane % 32u == 0u) {
        red[lane / 32u] = s;
    }
    workgroupBarrier();
    var total = 0.0;
    for (var i = 0u; i < WG / 32u; i++) {
        total += red[i];
    }
    // Also orders this call's reads of `red` before a later call's writes.
    workgroupBarrier();
    return total;
}
