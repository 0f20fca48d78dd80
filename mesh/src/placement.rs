//! Where a request runs, as a plain function of the cluster view: on one node (colocated) or
//! split, its prompt prefilled on node P whose K/V streams layer by layer to node D, which
//! decodes (DistServe, Splitwise). Every plan is scored by its expected time to first token plus
//! the expected output times the expected time per output token, from the nodes' measured
//! speeds, queues and K/V room and the measured K/V rate from P to D; the best plans come first.
//! A split pays a fixed overhead and the part of the transfer compute cannot hide, so short
//! prompts and slow links stay colocated. The node that served a conversation before keeps it
//! (its prefix cache holds the earlier turns) while it is nearly as good.

use libp2p::PeerId;

use crate::cluster::{ClusterView, NodeState};
use crate::messages::{LoadReport, ModelAd};
use crate::roles::Role;

/// Share of a node's measured matmul GFLOP/s a whole forward pass achieves.
const PREFILL_EFFICIENCY: f64 = 0.5;
/// Cost of going through another node rather than serving here.
const FORWARD_COST_S: f64 = 0.005;
/// Fixed cost of a split: reserving on D, opening the K/V stream, the extra hop of the first token.
const SPLIT_OVERHEAD_S: f64 = 0.010;
/// Assumed K/V rate between two nodes before one has been measured.
pub const DEFAULT_LINK_BYTES_PER_S: f64 = 1e9;
/// Expected wait when a node has no KV room for the request.
const NO_ROOM_S: f64 = 2.0;
/// Work on a node against its role (decoding on a prefill node, prefilling on a decode node)
/// counts this much more: it takes the node from the work it is there for.
const OFF_ROLE: f64 = 1.25;
/// A node that served the conversation before keeps it while within this factor of the best.
const AFFINITY_SLACK: f64 = 1.5;

/// What placement needs to know of a request.
#[derive(Clone, Debug)]
pub struct PlacementRequest<'a> {
    pub model: &'a str,
    /// Prompt length, estimated where the entry node has no tokenizer.
    pub prompt_tokens: usize,
    /// Expected output tokens (the length predictor's estimate).
    pub output_tokens: usize,
    /// The node that served this conversation's earlier turns.
    pub affinity: Option<PeerId>,
    /// Nodes that already failed this request.
    pub exclude: &'a [PeerId],
    /// Which plans to consider.
    pub mode: PlacementMode,
}

/// Which plans placement may choose (an operator's override for measurements; `Auto` serves).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PlacementMode {
    #[default]
    Auto,
    Colocated,
    Split,
}

impl std::str::FromStr for PlacementMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(PlacementMode::Auto),
            "colocated" => Ok(PlacementMode::Colocated),
            "split" => Ok(PlacementMode::Split),
            other => Err(format!("unknown placement `{other}` (auto, colocated, split)")),
        }
    }
}

/// The node that prefills a split request.
#[derive(Clone, Debug, PartialEq)]
pub struct PrefillNode {
    pub peer: PeerId,
    pub is_self: bool,
    pub fingerprint: String,
}

/// One plan, best first in [`place`]'s answer.
#[derive(Clone, Debug, PartialEq)]
pub struct Placement {
    /// The node that decodes (and prefills too, unless `prefill` says otherwise).
    pub peer: PeerId,
    pub is_self: bool,
    /// The fingerprint its ad gives for the model.
    pub fingerprint: String,
    /// Set for a split plan.
    pub prefill: Option<PrefillNode>,
    pub expected_ttft_s: f64,
    pub expected_tpot_s: f64,
}

impl Placement {
    fn score(&self, output_tokens: usize) -> f64 {
        self.expected_ttft_s + output_tokens as f64 * self.expected_tpot_s
    }
}

/// Expected prompt tokens per second of a node with this matmul speed on a model of `parameters`.
pub fn prefill_tokens_per_s(gflops: f64, parameters: u64) -> f64 {
    (gflops * 1e9 * PREFILL_EFFICIENCY / (2.0 * parameters.max(1) as f64)).max(1e-3)
}

/// A usable node's figures for this request.
struct Node<'a> {
    peer: PeerId,
    is_self: bool,
    role: Role,
    model: &'a ModelAd,
    load: LoadReport,
    /// Prompt tokens per second.
    rate: f64,
    /// Seconds of one decode step.
    step_s: f64,
}

impl Node<'_> {
    fn prefill_s(&self, tokens: usize) -> f64 {
        (self.load.queued_prefill_tokens as f64 + tokens as f64) / self.rate
    }
    fn lacks_room(&self, tokens: usize) -> bool {
        self.load.kv_blocks_total > 0 && self.load.kv_blocks_free < tokens.div_ceil(16) as u64
    }
    fn tpot_s(&self, output_tokens: usize) -> f64 {
        // Decoding shares each step with the batch, and with the node's queued prefill spread
        // over this request's tokens.
        self.step_s * (1.0 + self.load.running as f64 / 8.0)
            + self.load.queued_prefill_tokens as f64 / self.rate / output_tokens.max(1) as f64
    }
    fn hop_s(&self) -> f64 {
        if self.is_self { 0.0 } else { FORWARD_COST_S }
    }
    /// The K/V rate from `from` to this node: measured, or assumed.
    fn link_from(&self, from: &PeerId) -> f64 {
        let from = from.to_string();
        // A link whose transfers were all too small to time has no rate yet (0).
        self.load.kv_links.iter().find(|l| l.from == from && l.bytes_per_s > 0.0).map_or(DEFAULT_LINK_BYTES_PER_S, |l| l.bytes_per_s)
    }
}

fn usable<'a>(view: &'a ClusterView, req: &PlacementRequest, peer: &PeerId, node: &'a NodeState) -> Option<Node<'a>> {
    let ad = node.ad.as_ref()?;
    let model = ad.models.iter().find(|m| m.id == req.model)?;
    let is_self = *peer == view.self_id();
    let load = node.load.clone().unwrap_or_default();
    let ok = ad.role.serves()
        && !load.draining
        && (is_self || node.connected)
        && !view.is_distrusted(peer, req.model)
        && !req.exclude.contains(peer);
    ok.then(|| Node {
        peer: *peer,
        is_self,
        role: ad.role,
        model,
        rate: prefill_tokens_per_s(ad.speed.gflops, model.parameters),
        step_s: model.weight_bytes as f64 / (ad.speed.gbps.max(1e-3) * 1e9),
        load,
    })
}

fn colocated(n: &Node, req: &PlacementRequest) -> Placement {
    let mut ttft = n.prefill_s(req.prompt_tokens) + n.step_s * (1.0 + n.load.running as f64 / 8.0) + n.hop_s();
    let mut tpot = n.tpot_s(req.output_tokens);
    if n.lacks_room(req.prompt_tokens + req.output_tokens) {
        ttft += NO_ROOM_S;
    }
    match n.role {
        Role::Prefill => tpot *= OFF_ROLE,
        Role::Decode => ttft *= OFF_ROLE,
        _ => {}
    }
    Placement {
        peer: n.peer,
        is_self: n.is_self,
        fingerprint: n.model.fingerprint.clone(),
        prefill: None,
        expected_ttft_s: ttft,
        expected_tpot_s: tpot,
    }
}

fn split(p: &Node, d: &Node, req: &PlacementRequest) -> Placement {
    let compute_s = p.prefill_s(req.prompt_tokens);
    let transfer_s = (req.prompt_tokens as f64 * p.model.kv_bytes_per_token as f64) / d.link_from(&p.peer);
    // Layers stream while later ones compute: what shows is the last layer's share, plus all
    // the transfer time beyond the prompt's own compute time on a slow link.
    let own_compute_s = req.prompt_tokens as f64 / p.rate;
    let exposed_s = (transfer_s - own_compute_s).max(0.0) + transfer_s / f64::from(p.model.layers.max(1));
    let mut ttft = compute_s + exposed_s + SPLIT_OVERHEAD_S + d.hop_s() + p.hop_s();
    if p.lacks_room(req.prompt_tokens) {
        ttft += NO_ROOM_S;
    }
    if d.lacks_room(req.prompt_tokens + req.output_tokens) {
        ttft += NO_ROOM_S;
    }
    Placement {
        peer: d.peer,
        is_self: d.is_self,
        fingerprint: d.model.fingerprint.clone(),
        prefill: Some(PrefillNode { peer: p.peer, is_self: p.is_self, fingerprint: p.model.fingerprint.clone() }),
        expected_ttft_s: ttft,
        expected_tpot_s: d.tpot_s(req.output_tokens),
    }
}

/// Every plan for the request, best first; empty when nobody serves the model.
pub fn place(view: &ClusterView, req: &PlacementRequest) -> Vec<Placement> {
    let nodes: Vec<Node> = view.nodes().filter_map(|(peer, node)| usable(view, req, peer, node)).collect();
    let mut out = Vec::new();
    if req.mode != PlacementMode::Split {
        out.extend(nodes.iter().map(|n| colocated(n, req)));
    }
    if req.mode != PlacementMode::Colocated {
        for p in nodes.iter().filter(|n| matches!(n.role, Role::Prefill | Role::Both)) {
            for d in nodes.iter().filter(|n| matches!(n.role, Role::Decode | Role::Both)) {
                // K/V moves only between nodes that compute the same tokens from it: the same
                // model, the same kernels (a deterministic node pairs only with another) and the
                // same K/V cache dtype (K/V moves exactly).
                if p.peer != d.peer
                    && p.model.fingerprint == d.model.fingerprint
                    && p.model.deterministic == d.model.deterministic
                    && p.model.kv_dtype == d.model.kv_dtype
                {
                    out.push(split(p, d, req));
                }
            }
        }
        if out.is_empty() && req.mode == PlacementMode::Split {
            // Nobody to split with: one node still serves it.
            out.extend(nodes.iter().map(|n| colocated(n, req)));
        }
    }
    let key = |p: &Placement| (p.peer, p.prefill.as_ref().map(|x| x.peer));
    out.sort_by(|a, b| a.score(req.output_tokens).total_cmp(&b.score(req.output_tokens)).then_with(|| key(a).cmp(&key(b))));
    if let (Some(aff), Some(best)) = (req.affinity, out.first().map(|p| p.score(req.output_tokens)))
        && let Some(i) = out.iter().position(|p| p.peer == aff && p.score(req.output_tokens) <= best * AFFINITY_SLACK + FORWARD_COST_S)
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
            kv_bytes_per_token: 30_000,
            layers: 30,
            deterministic: false,
            kv_dtype: "f16".into(),
            span: None,
        }
    }

    fn add(v: &mut ClusterView, peer: PeerId, role: Role, gflops: f64, load: LoadReport) {
        add_model(v, peer, role, gflops, load, model());
    }

    fn add_model(v: &mut ClusterView, peer: PeerId, role: Role, gflops: f64, load: LoadReport, model: ModelAd) {
        let ad = CapabilityAd {
            peer_id: peer.to_string(),
            role,
            speed: Speed { gflops, gbps: 100.0 },
            models: vec![model],
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
        let req = PlacementRequest {
            model: "m",
            prompt_tokens: 500,
            output_tokens: 100,
            affinity: None,
            exclude: &[],
            mode: PlacementMode::Colocated,
        };
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
        let req = PlacementRequest {
            model: "m",
            prompt_tokens: 500,
            output_tokens: 100,
            affinity: Some(b),
            exclude: &[],
            mode: PlacementMode::Colocated,
        };
        assert_eq!(order(&v, &req)[0], b, "within the slack");
        add(&mut v, b, Role::Both, 100.0, idle());
        assert_eq!(order(&v, &req)[0], a, "ten times slower: affinity yields");
        // A disconnected peer cannot be reached.
        v.disconnected(a, "test");
        assert_eq!(order(&v, &req), [b]);
    }

    fn plans(v: &ClusterView, prompt_tokens: usize, mode: PlacementMode) -> Vec<(PeerId, Option<PeerId>)> {
        let req = PlacementRequest { model: "m", prompt_tokens, output_tokens: 100, affinity: None, exclude: &[], mode };
        place(v, &req).into_iter().map(|p| (p.peer, p.prefill.map(|x| x.peer))).collect()
    }

    #[test]
    fn long_prompts_split_short_ones_and_slow_links_stay_colocated() {
        let me = PeerId::random();
        let (p, d) = (PeerId::random(), PeerId::random());
        let mut v = ClusterView::new(me, Duration::from_secs(5));
        add(&mut v, me, Role::Observer, 0.0, idle());
        add(&mut v, p, Role::Prefill, 1000.0, idle());
        add(&mut v, d, Role::Decode, 1000.0, idle());
        assert_eq!(plans(&v, 2000, PlacementMode::Auto)[0], (d, Some(p)), "a long prompt is prefilled on P and decoded on D");
        assert_eq!(plans(&v, 8, PlacementMode::Auto)[0], (d, None), "a short one is not worth the split: D does it all");
        // Never the other way round, and never from a node to itself.
        assert!(plans(&v, 2000, PlacementMode::Auto).iter().filter(|x| x.1.is_some()).all(|&(dec, pre)| dec == d && pre == Some(p)));

        // D measured 1 MB/s from P: moving 60 MB of K/V would take a minute.
        let slow = LoadReport { kv_links: vec![crate::messages::KvLinkRate { from: p.to_string(), bytes_per_s: 1e6, bytes: 0 }], ..idle() };
        add(&mut v, d, Role::Decode, 1000.0, slow);
        assert_eq!(plans(&v, 2000, PlacementMode::Auto)[0].1, None, "slow link: colocated");
        assert_eq!(plans(&v, 2000, PlacementMode::Split)[0], (d, Some(p)), "unless the operator forces a split");
        assert!(plans(&v, 2000, PlacementMode::Colocated).iter().all(|x| x.1.is_none()));

        // No K/V room on D for the request: the split goes elsewhere or not at all.
        add(&mut v, d, Role::Decode, 1000.0, LoadReport { kv_blocks_free: 10, ..idle() });
        assert_eq!(plans(&v, 2000, PlacementMode::Auto)[0], (p, None));
    }

    #[test]
    fn k_v_moves_only_between_nodes_with_the_same_fingerprint_kernel_mode_and_cache_dtype() {
        let me = PeerId::random();
        let (p, d) = (PeerId::random(), PeerId::random());
        let mut v = ClusterView::new(me, Duration::from_secs(5));
        add(&mut v, p, Role::Prefill, 1000.0, idle());
        add_model(&mut v, d, Role::Decode, 1000.0, idle(), ModelAd { fingerprint: "other".into(), ..model() });
        assert!(plans(&v, 2000, PlacementMode::Auto).iter().all(|x| x.1.is_none()));
        // A forced split with nobody to split with still serves the request on one node.
        assert!(!plans(&v, 2000, PlacementMode::Split).is_empty());
        // The same model in the other kernel mode is no partner either.
        add_model(&mut v, d, Role::Decode, 1000.0, idle(), ModelAd { deterministic: true, ..model() });
        assert!(plans(&v, 2000, PlacementMode::Auto).iter().all(|x| x.1.is_none()));
        // Nor with its K/V cache in another dtype.
        add_model(&mut v, d, Role::Decode, 1000.0, idle(), ModelAd { kv_dtype: "other".into(), ..model() });
        assert!(plans(&v, 2000, PlacementMode::Split).iter().all(|x| x.1.is_none()));
        add_model(&mut v, d, Role::Decode, 1000.0, idle(), model());
        assert!(plans(&v, 2000, PlacementMode::Split).iter().any(|x| x.1 == Some(p)));
    }

    #[test]
    fn a_busy_prefill_queue_sends_the_prompt_to_another_prefill_node() {
        let me = PeerId::random();
        let (p1, p2, d) = (PeerId::random(), PeerId::random(), PeerId::random());
        let mut v = ClusterView::new(me, Duration::from_secs(5));
        add(&mut v, p1, Role::Prefill, 1000.0, LoadReport { queued_prefill_tokens: 50_000, ..idle() });
        add(&mut v, p2, Role::Prefill, 1000.0, idle());
        add(&mut v, d, Role::Decode, 1000.0, idle());
        assert_eq!(plans(&v, 2000, PlacementMode::Auto)[0], (d, Some(p2)));
    }
}
