//! Where a request runs: the node with the least expected time to first token, from its measured
//! speed, its queue and its KV room, with a preference for the node that served the same
//! conversation before (its prefix cache holds the earlier turns). A plain function of the view.

use libp2p::PeerId;

use crate::cluster::ClusterView;
use crate::roles::Role;

/// Share of a node's measured matmul GFLOP/s a whole forward pass achieves.
const PREFILL_EFFICIENCY: f64 = 0.5;
/// Cost of going through another node rather than serving here.
const FORWARD_COST_S: f64 = 0.005;
/// Expected wait when a node has no KV room for the prompt.
const NO_ROOM_S: f64 = 2.0;
/// A node that served the conversation before keeps it while within this factor of the best.
const AFFINITY_SLACK: f64 = 1.5;

/// What placement needs to know of a request.
#[derive(Clone, Debug)]
pub struct PlacementRequest<'a> {
    pub model: &'a str,
    /// Prompt length, estimated where the entry node has no tokenizer.
    pub prompt_tokens: usize,
    /// The node that served this conversation's earlier turns.
    pub affinity: Option<PeerId>,
    /// Nodes that already failed this request.
    pub exclude: &'a [PeerId],
}

/// One candidate node, best first in [`place`]'s answer.
#[derive(Clone, Debug, PartialEq)]
pub struct Placement {
    pub peer: PeerId,
    pub is_self: bool,
    /// The fingerprint its ad gives for the model.
    pub fingerprint: String,
    pub expected_ttft_s: f64,
}

/// Expected prompt tokens per second of a node with this matmul speed on a model of `parameters`.
pub fn prefill_tokens_per_s(gflops: f64, parameters: u64) -> f64 {
    (gflops * 1e9 * PREFILL_EFFICIENCY / (2.0 * parameters.max(1) as f64)).max(1e-3)
}

/// Every node that can take the request, best first; empty when nobody serves the model.
pub fn place(view: &ClusterView, req: &PlacementRequest) -> Vec<Placement> {
    let me = view.self_id();
    let mut out: Vec<Placement> = view
        .nodes()
        .filter_map(|(peer, node)| {
            let ad = node.ad.as_ref()?;
            let model = ad.models.iter().find(|m| m.id == req.model)?;
            let is_self = *peer == me;
            let load = node.load.clone().unwrap_or_default();
            let usable = ad.role.serves()
                && !load.draining
                && (is_self || node.connected)
                && !view.is_distrusted(peer, req.model)
                && !req.exclude.contains(peer);
            if !usable {
                return None;
            }
            let prefill_s =
                (load.queued_prefill_tokens as f64 + req.prompt_tokens as f64) / prefill_tokens_per_s(ad.speed.gflops, model.parameters);
            let step_s = model.weight_bytes as f64 / (ad.speed.gbps.max(1e-3) * 1e9);
            let blocks_needed = req.prompt_tokens.div_ceil(16) as u64;
            let mut ttft = prefill_s + step_s * (1.0 + load.running as f64 / 8.0);
            if load.kv_blocks_total > 0 && load.kv_blocks_free < blocks_needed {
                ttft += NO_ROOM_S;
            }
            if !is_self {
                ttft += FORWARD_COST_S;
            }
            // Split-role nodes are meant for disaggregated work; use them when they are clearly faster.
            if matches!(ad.role, Role::Prefill | Role::Decode) {
                ttft *= 1.25;
            }
            Some(Placement { peer: *peer, is_self, fingerprint: model.fingerprint.clone(), expected_ttft_s: ttft })
        })
        .collect();
    out.sort_by(|a, b| a.expected_ttft_s.total_cmp(&b.expected_ttft_s).then_with(|| a.peer.cmp(&b.peer)));
    if let (Some(aff), Some(best)) = (req.affinity, out.first().map(|p| p.expected_ttft_s))
        && let Some(i) = out.iter().position(|p| p.peer == aff && p.expected_ttft_s <= best * AFFINITY_SLACK + FORWARD_COST_S)
    {
        let p = out.remove(i);
        out.insert(0, p);
    }
    out
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;
    use crate::messages::{CapabilityAd, GossipMessage, LoadReport, ModelAd, Speed};

    fn model() -> ModelAd {
        ModelAd {
            id: "m".into(),
            fingerprint: "f".into(),
            parameters: 135_000_000,
            weight_bytes: 100_000_000,
            context: 8192,
            kv_bytes_per_token: 1,
        }
    }

    fn add(v: &mut ClusterView, peer: PeerId, role: Role, gflops: f64, load: LoadReport) {
        let ad = CapabilityAd {
            peer_id: peer.to_string(),
            role,
            speed: Speed { gflops, gbps: 100.0 },
            models: vec![model()],
            ..Default::default()
        };
        if peer == v.self_id() {
            v.set_own(Some(ad), Some(load));
            return;
        }
        let t = Instant::now();
        v.apply(peer, GossipMessage::Capability(ad), t).expect("ad");
        v.apply(peer, GossipMessage::Load(LoadReport { peer_id: peer.to_string(), ..load }), t).expect("load");
        v.connected(peer, t);
    }

    fn idle() -> LoadReport {
        LoadReport { kv_blocks_free: 1000, kv_blocks_total: 1000, ..Default::default() }
    }

    fn order(v: &ClusterView, req: &PlacementRequest) -> Vec<PeerId> {
        place(v, req).into_iter().map(|p| p.peer).collect()
    }

    #[test]
    fn the_least_expected_ttft_wins() {
        let me = PeerId::random();
        let (fast, slow, obs) = (PeerId::random(), PeerId::random(), PeerId::random());
        let mut v = ClusterView::new(me, Duration::from_secs(5));
        add(&mut v, me, Role::Both, 100.0, idle());
        add(&mut v, fast, Role::Both, 10_000.0, idle());
        add(&mut v, slow, Role::Both, 10.0, idle());
        add(&mut v, obs, Role::Observer, 1e6, idle());
        let req = PlacementRequest { model: "m", prompt_tokens: 500, affinity: None, exclude: &[] };
        assert_eq!(order(&v, &req), [fast, me, slow], "observers never serve");
        // The fast node gets a long queue; this node, idle, now wins.
        add(&mut v, fast, Role::Both, 10_000.0, LoadReport { queued_prefill_tokens: 2_000_000, ..idle() });
        assert_eq!(order(&v, &req)[0], me);
        // Busy: no KV room for the prompt, while the fast node's queue has cleared.
        add(&mut v, fast, Role::Both, 10_000.0, idle());
        add(&mut v, me, Role::Both, 100.0, LoadReport { kv_blocks_free: 3, ..idle() });
        assert_eq!(order(&v, &req)[0], fast);
        // Draining nodes, distrusted models and excluded peers are out.
        add(&mut v, fast, Role::Both, 10_000.0, LoadReport { draining: true, ..idle() });
        v.distrust(slow, "m", "fingerprint mismatch");
        assert_eq!(order(&v, &req), [me]);
        // A reconnect does not restore trust.
        v.disconnected(slow, "blip");
        add(&mut v, slow, Role::Both, 10.0, idle());
        assert_eq!(order(&v, &req), [me]);
        assert_eq!(order(&v, &PlacementRequest { exclude: &[me], ..req.clone() }), Vec::<PeerId>::new());
        assert!(order(&v, &PlacementRequest { model: "other", ..req }).is_empty(), "nobody serves it");
    }

    #[test]
    fn a_conversation_stays_on_its_node_unless_that_is_much_slower() {
        let me = PeerId::random();
        let (a, b) = (PeerId::random(), PeerId::random());
        let mut v = ClusterView::new(me, Duration::from_secs(5));
        add(&mut v, a, Role::Both, 1000.0, idle());
        add(&mut v, b, Role::Both, 900.0, idle());
        let req = PlacementRequest { model: "m", prompt_tokens: 500, affinity: Some(b), exclude: &[] };
        assert_eq!(order(&v, &req)[0], b, "within the slack");
        add(&mut v, b, Role::Both, 100.0, idle());
        assert_eq!(order(&v, &req)[0], a, "ten times slower: affinity yields");
        // A disconnected peer cannot be reached.
        v.disconnected(a, "test");
        assert_eq!(order(&v, &req), [b]);
    }
}
