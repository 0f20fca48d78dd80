//! How long the console takes to build and tessellate one frame of a 200-node cluster whose
//! nodes all report every second (the CPU side of a frame; the GPU draws the resulting meshes).
//!   cargo run --release -p tandem-console --example frame_time [-- NODES FRAMES]

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use tandem_console::state::{ClusterState, SourceInfo, Tab};

fn main() {
    let mut args = std::env::args().skip(1).map(|a| a.parse::<usize>().expect("a number"));
    let nodes = args.next().unwrap_or(200);
    let frames = args.next().unwrap_or(1200);
    let ctx = egui::Context::default();
    for tab in [Tab::Nodes, Tab::Requests, Tab::Events] {
        let mut s = ClusterState::new(SourceInfo { label: "bench".into(), can_control: true, why_not: String::new() });
        s.tab = tab;
        s.selected = Some(common::peer(3));
        let mut times = Vec::with_capacity(frames);
        let mut vertices = 0;
        for frame in 0..frames {
            let start = Instant::now();
            // 60 frames a second; every node's report arrives once a second (all at once here,
            // the worst case).
            if frame % 60 == 0 {
                s.apply(&common::snapshot(nodes, frame as u64 / 60 + 1), frame as f64 / 60.0);
            }
            let input = egui::RawInput {
                screen_rect: Some(egui::Rect::from_min_size(egui::Pos2::ZERO, egui::vec2(1600.0, 1000.0))),
                time: Some(frame as f64 / 60.0),
                ..Default::default()
            };
            let mut out = ctx.run_ui(input, |ui| tandem_console::views::console(ui, &mut s));
            // A renderer would upload the font atlas; there is none here.
            out.textures_delta.clear();
            let meshes = ctx.tessellate(out.shapes, out.pixels_per_point);
            vertices = meshes
                .iter()
                .map(|m| match &m.primitive {
                    egui::epaint::Primitive::Mesh(m) => m.vertices.len(),
                    _ => 0,
                })
                .sum::<usize>();
            times.push(start.elapsed());
        }
        times.sort();
        let mean = times.iter().sum::<Duration>() / frames as u32;
        let p99 = times[frames * 99 / 100];
        let max = times[frames - 1];
        println!(
            "{nodes} nodes, {tab:?} tab, {} flows: mean {:.2} ms, p99 {:.2} ms, max {:.2} ms per frame ({:.0} fps at the mean), {vertices} vertices",
            s.flows.len(),
            mean.as_secs_f64() * 1e3,
            p99.as_secs_f64() * 1e3,
            max.as_secs_f64() * 1e3,
            1.0 / mean.as_secs_f64()
        );
    }
}
