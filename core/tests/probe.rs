//! The start-up speed probe on whatever adapter is present (lavapipe in CI): both figures are
//! positive, finite and within what any adapter of today could reach.

use std::time::Instant;

use tandem_core::{GpuContext, measure_speed};

#[test]
fn the_speed_probe_reports_plausible_figures() {
    let ctx = GpuContext::new(std::env::var("TANDEM_ADAPTER").ok().as_deref()).expect("a GPU adapter (install mesa-vulkan-drivers)");
    let start = Instant::now();
    let speed = measure_speed(&ctx).expect("probe");
    let took = start.elapsed();
    println!("{}: {:.2} GFLOP/s, {:.2} GB/s in {took:.2?}", ctx.adapter, speed.gflops, speed.gbps);
    assert!(speed.gflops.is_finite() && speed.gflops > 0.0 && speed.gflops < 1e6, "{speed:?}");
    assert!(speed.gbps.is_finite() && speed.gbps > 0.0 && speed.gbps < 1e5, "{speed:?}");
}
