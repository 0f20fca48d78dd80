//! The console's state, without a window: snapshots in, table rows, flows, charts' samples,
//! traces and events out.

mod common;

use tandem_console::state::{ClusterState, SortKey, SourceInfo};
use tandem_mesh::{ControlCommand, Role};

#[test]
fn snapshots_become_rows_live_flows_samples_and_a_deduplicated_timeline() {
    let mut s = ClusterState::new(SourceInfo { can_control: true, ..Default::default() });
    s.apply(&common::snapshot(10, 1), 0.0);
    assert_eq!(s.nodes.len(), 10);
    assert!(s.flows.is_empty(), "a rate needs two readings");
    s.apply(&common::snapshot(10, 2), 1.0);
    // Decode node 3 gets 100 MB more each second from prefill node 0 (its `i % 3` = 0th),
    // node 4 50 MB from prefill node 1.
    let rate =
        |from: usize, to: usize| s.flows.iter().find(|f| f.from == common::peer(from) && f.to == common::peer(to)).map(|f| f.bytes_per_s);
    assert_eq!(rate(0, 3), Some(100e6));
    assert_eq!(rate(1, 4), Some(50e6));
    assert_eq!(s.flows.len(), 5, "decode nodes 3 to 7 each receive from one prefill node");
    // The same reports again (a snapshot between two load reports) keep the flows.
    s.apply(&common::snapshot(10, 2), 1.5);
    assert_eq!(s.flows.len(), 5);
    s.apply(&common::snapshot(10, 2), 5.0);
    assert!(s.flows.is_empty(), "a stream that stopped growing is over");

    assert_eq!(s.traces.len(), 10, "5 decode nodes × 2 distinct seconds; repeats dropped");
    assert_eq!(s.events.len(), 1, "the same event in every snapshot is kept once");
    let last = *s.history.back().expect("a sample");
    // TTFT of node i's trace is 90 + i ms (decode nodes 3..=7), TPOT 20 ms.
    assert_eq!(last.ttft_p50_ms, Some(95.0));
    assert_eq!(last.ttft_p99_ms, Some(97.0));
    assert_eq!(last.tpot_p50_ms, Some(20.0));
    assert_eq!(last.slo_attainment, Some(1.0));
    s.slo.ttft_ms = 95.0;
    s.apply(&common::snapshot(10, 3), 7.0);
    let a = s.history.back().and_then(|x| x.slo_attainment).expect("attainment");
    assert!((a - 0.6).abs() < 1e-9, "TTFT 93..97 against 95 ms: 3 of 5 per second meet it, got {a}");
    assert_eq!(s.history.back().map(|x| x.tokens_per_s), Some((0..9).map(|i| 10.0 + i as f64).sum()), "observers do not count");
}

#[test]
fn the_table_sorts_filters_and_the_actions_need_confirmation_and_the_secret() {
    let mut s = ClusterState::new(SourceInfo { can_control: true, ..Default::default() });
    s.apply(&common::snapshot(200, 1), 0.0);
    assert_eq!(s.table_rows().len(), 200);
    s.sort_by(SortKey::TokensPerS);
    assert_eq!(s.table_rows()[0].peer_id, common::peer(198), "fastest first (199 is an observer)");
    s.sort_by(SortKey::TokensPerS);
    assert_eq!(s.table_rows()[0].tokens_per_s, 0.0, "a second click flips the order");
    s.filter = "prefill".into();
    assert!(s.table_rows().iter().all(|n| n.role == Some(Role::Prefill)));
    assert_eq!(s.table_rows().len(), 60);
    s.filter = "000042".into();
    assert_eq!(s.table_rows().len(), 1);

    s.propose(&common::peer(42), ControlCommand::Drain { drain: true });
    assert!(s.outbox.is_empty(), "nothing is sent before the confirmation");
    s.cancel();
    s.confirm();
    assert!(s.outbox.is_empty(), "a cancelled action is gone");
    s.propose(&common::peer(42), ControlCommand::Drain { drain: true });
    s.confirm();
    assert_eq!(s.outbox.len(), 1);

    let mut read_only = ClusterState::new(SourceInfo::default());
    read_only.propose(&common::peer(1), ControlCommand::Drain { drain: true });
    read_only.confirm();
    assert!(read_only.outbox.is_empty(), "without the secret there is nothing to confirm");
}

/// Chains of span-holding nodes: each node's span shows with its model, the source's chains are
/// kept, and hidden-state bytes between stages become flows of their own kind.
#[test]
fn chains_show_their_spans_and_the_hidden_state_traffic_between_stages() {
    use tandem_console::state::FlowKind;
    use tandem_mesh::{ChainSnapshot, HiddenLinkBytes, StageSnapshot};

    let chained = |t: u64| {
        let mut snap = common::snapshot(3, t);
        for (i, n) in snap.nodes.iter_mut().enumerate().take(2) {
            n.models[0].span = Some(if i == 0 { [0, 15] } else { [15, 30] });
            n.models[0].layers = 30;
            let other = common::peer(1 - i);
            n.load.as_mut().expect("load").hidden_links = vec![HiddenLinkBytes { from: other, bytes: t * 8192 * 50 }];
        }
        snap.chains = vec![ChainSnapshot {
            model: "smollm2-135m".into(),
            fingerprint: "f".into(),
            stages: (0..2).map(|i| StageSnapshot { peer_id: common::peer(i), layers: [15 * i as u32, 15 * (i as u32 + 1)] }).collect(),
            prefill: vec![],
            expected_ttft_ms: 40.0,
            expected_tpot_ms: 6.0,
        }];
        snap
    };
    let mut s = ClusterState::new(SourceInfo::default());
    s.apply(&chained(1), 0.0);
    s.apply(&chained(2), 1.0);
    assert_eq!(s.nodes[&common::peer(0)].models, ["smollm2-135m layers 0–15"]);
    assert_eq!(s.nodes[&common::peer(1)].models, ["smollm2-135m layers 15–30"]);
    assert_eq!(s.chains.len(), 1);
    let hidden: Vec<_> =
        s.flows.iter().filter(|f| f.kind == FlowKind::Hidden).map(|f| (f.from.clone(), f.to.clone(), f.bytes_per_s)).collect();
    assert_eq!(hidden, [(common::peer(0), common::peer(1), 409_600.0), (common::peer(1), common::peer(0), 409_600.0)]);
}
