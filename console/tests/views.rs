//! The console's views driven like a person would (egui_kittest: widgets found by label, clicked),
//! on a 200-node cluster.

mod common;

use egui_kittest::Harness;
use egui_kittest::kittest::Queryable;
use tandem_console::state::{ClusterState, ControlOrder, SourceInfo, Tab};
use tandem_mesh::{ControlCommand, Role};

fn cluster(n: usize, can_control: bool) -> ClusterState {
    let mut s = ClusterState::new(SourceInfo { label: "test".into(), can_control, why_not: "no secret".into() });
    for t in 0..3 {
        s.apply(&common::snapshot(n, t), t as f64);
    }
    s
}

fn harness(state: ClusterState) -> Harness<'static, ClusterState> {
    Harness::builder().with_size([1600.0, 1000.0]).build_ui_state(|ui, s: &mut ClusterState| tandem_console::views::console(ui, s), state)
}

#[test]
fn flipping_a_role_and_draining_among_200_nodes_sends_the_confirmed_orders() {
    let mut h = harness(cluster(200, true));
    h.run_steps(2);
    h.get_by_label("200 nodes");
    h.get_by_label("60 prefill");
    h.get_by_label("100 decode");
    // Find node 42 with the filter, select it in the table.
    h.state_mut().filter = "000042".into();
    h.run_steps(2);
    h.get_by_label("1 of 200 nodes");
    h.get_by_label("000042").click();
    h.run_steps(2);
    assert_eq!(h.state().selected.as_deref(), Some(common::peer(42).as_str()));
    h.get_by_label("Node 000042");

    // Node 42 is pinned to prefill: it can be made a decode node, after a confirmation.
    h.get_by_label("Make decode").click();
    h.run_steps(2);
    assert!(h.state().outbox.is_empty(), "nothing is sent before Confirm");
    h.get_by_label("Confirm").click();
    h.run_steps(2);
    assert_eq!(h.state().outbox, vec![ControlOrder { target: common::peer(42), command: ControlCommand::SetRole { role: Role::Decode } }]);
    h.state_mut().outbox.clear();

    h.get_by_label("Drain").click();
    h.run_steps(2);
    h.get_by_label("Cancel").click();
    h.run_steps(2);
    assert!(h.state().outbox.is_empty() && h.state().pending.is_none(), "cancelled");
    h.get_by_label("Drain").click();
    h.run_steps(2);
    h.get_by_label("Confirm").click();
    h.run_steps(2);
    assert_eq!(h.state().outbox, vec![ControlOrder { target: common::peer(42), command: ControlCommand::Drain { drain: true } }]);
}

#[test]
fn without_the_mesh_secret_the_actions_are_disabled() {
    let mut s = cluster(3, false);
    s.selected = Some(common::peer(0));
    let mut h = harness(s);
    h.run_steps(2);
    h.get_by_label("read-only");
    h.get_by_label("Drain").click();
    h.run_steps(2);
    assert!(h.state().pending.is_none() && h.query_by_label("Confirm").is_none(), "a disabled button does nothing");
}

#[test]
fn the_table_sorts_by_a_clicked_header_and_the_other_tabs_show_requests_and_events() {
    let mut h = harness(cluster(200, true));
    h.run_steps(2);
    h.get_by_label("tok/s").click();
    h.run_steps(2);
    // Fastest first: node 198 does 208 tok/s and is now the first row, so on screen.
    h.get_by_label("000198");
    h.get_by_label("tok/s v");

    h.state_mut().tab = Tab::Requests;
    h.run_steps(2);
    h.get_by_label("Last 40 requests, newest first; each row from its arrival.");
    h.state_mut().tab = Tab::Events;
    h.run_steps(2);
    h.get_by_label("role prefill");
}

#[test]
fn the_graph_keeps_1_to_200_nodes_apart_inside_its_area() {
    let area = egui::Rect::from_min_size(egui::pos2(10.0, 20.0), egui::vec2(760.0, 460.0));
    for n in [1, 3, 40, 200] {
        let s = cluster(n, false);
        let rows: Vec<_> = s.nodes.values().collect();
        let (pos, r) = tandem_console::views::graph::layout(&rows, area);
        assert_eq!(pos.len(), n, "every node has a place");
        assert!(r >= 2.5, "{n} nodes: radius {r}");
        let points: Vec<egui::Pos2> = pos.values().copied().collect();
        for (i, a) in points.iter().enumerate() {
            assert!(area.shrink(r).contains(*a), "{n} nodes: {a:?} outside {area:?}");
            for b in &points[i + 1..] {
                assert!(a.distance(*b) >= 2.0 * r, "{n} nodes overlap: {a:?} {b:?} (radius {r})");
            }
        }
    }
}

#[test]
fn a_chain_of_spans_is_drawn_stage_by_stage() {
    let mut s = cluster(3, false);
    let mut snap = common::snapshot(3, 3);
    snap.chains = vec![tandem_mesh::ChainSnapshot {
        model: "smollm2-135m".into(),
        fingerprint: "f".into(),
        stages: vec![
            tandem_mesh::StageSnapshot { peer_id: common::peer(0), layers: [0, 15] },
            tandem_mesh::StageSnapshot { peer_id: common::peer(1), layers: [15, 30] },
        ],
        prefill: vec![],
        expected_ttft_ms: 40.0,
        expected_tpot_ms: 6.0,
    }];
    s.apply(&snap, 3.0);
    let mut h = harness(s);
    h.run_steps(2);
    h.get_by_label("chain · smollm2-135m");
    h.get_by_label("000000 [0–15) -> 000001 [15–30)");
}
