//! Where a request runs, as a plain function of the cluster view: on one node (colocated) or
//! split, its prompt prefilled on node P whose K/V streams layer by layer to node D, which
//! decodes (DistServe, Splitwise). Every plan is scored by its expected time to first token plus
//! the expected output times the expected time per output token, from the nodes' measured
//! speeds, queues and K/V room and the measured K/V rate from P to D; the best plans come first.
//! A split pays a fixed overhead and the part of the transfer compute cannot hide, so short
//! prompts and slow links stay colocated. The node that served a conversation before keeps it
//! (its prefix cache holds the earlier turns) while it is nearly as good.
//!
//! A node may hold only a span of a model's layers. Such nodes serve no request alone: a chain
//! of them whose spans tile the model does, one stage after another every step ([`chains`]). A
//! chain splits too: a chain of prefill nodes computes the prompt, each stage handing its span's
//! K/V to the decode stage of the same span, and the chain of decode nodes goes on from there.

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
/// Cost of a remote stage of a chain, every step: the driver sends it the step and waits for its
/// output, a round trip on the LAN with a few KB of residual stream per token.
const HIDDEN_HOP_S: f64 = 0.002;
/// Most chains [`chains`] completes from each group of nodes that may chain, and most stages it
/// tries in all: overlapping spans tile a model in many ways, and a request needs a few good ones.
const MAX_CHAINS: usize = 64;
const MAX_STAGE_TRIES: usize = 4096;

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

/// One node's part of a chain: it runs the layers `[start, end)` of every step.
#[derive(Clone, Debug, PartialEq)]
pub struct Stage {
    pub peer: PeerId,
    pub is_self: bool,
    /// Its whole advertised span.
    pub layers: [u32; 2],
}

/// A request served by a chain of nodes whose spans tile the model's layers, in layer order.
#[derive(Clone, Debug, PartialEq)]
pub struct Chain {
    /// The stages that decode (and prefill too, unless `prefill` says otherwise); the first
    /// drives the request.
    pub stages: Vec<Stage>,
    /// Set for a split chain: the prefill stages, one per decode stage, of the same spans.
    pub prefill: Option<Vec<Stage>>,
    /// The fingerprint every stage's ad gives for the model.
    pub fingerprint: String,
    pub expected_ttft_s: f64,
    pub expected_tpot_s: f64,
}

impl Chain {
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
    /// The share of the model's work its span holds.
    fn share(&self) -> f64 {
        let [start, end] = self.model.layer_span();
        f64::from(end.saturating_sub(start)) / f64::from(self.model.layers.max(1))
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

/// Every plan for the request, best first; empty when nobody serves the model by itself (nodes
/// holding a span of its layers serve it in [`chains`] only).
pub fn place(view: &ClusterView, req: &PlacementRequest) -> Vec<Placement> {
    let nodes: Vec<Node> = view.nodes().filter_map(|(peer, node)| usable(view, req, peer, node)).filter(|n| n.model.holds_all()).collect();
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

fn chain(stages: &[&Node], req: &PlacementRequest) -> Chain {
    // Every stage does its span's share of the model's work; the driver talks to each remote
    // stage in turn, so each costs a round trip every step.
    let hops_s = stages.iter().filter(|n| !n.is_self).count() as f64 * HIDDEN_HOP_S;
    let tokens = req.prompt_tokens + req.output_tokens;
    // Work against a stage's role counts more, as for one node.
    let off = |n: &Node, role: Role| if n.role == role { OFF_ROLE } else { 1.0 };
    let mut ttft = hops_s
        + stages
            .iter()
            .map(|n| (n.prefill_s(req.prompt_tokens) + n.step_s * (1.0 + n.load.running as f64 / 8.0)) * n.share() * off(n, Role::Decode))
            .sum::<f64>();
    if stages.iter().any(|n| n.lacks_room(tokens)) {
        ttft += NO_ROOM_S;
    }
    Chain {
        stages: stages.iter().map(|n| Stage { peer: n.peer, is_self: n.is_self, layers: n.model.layer_span() }).collect(),
        prefill: None,
        fingerprint: stages.first().map(|n| n.model.fingerprint.clone()).unwrap_or_default(),
        expected_ttft_s: ttft,
        expected_tpot_s: hops_s + stages.iter().map(|n| n.tpot_s(req.output_tokens) * n.share() * off(n, Role::Prefill)).sum::<f64>(),
    }
}

/// `decode` split: for each of its stages, the fastest prefill node of `nodes` holding the same
/// span with the same K/V dtype (K/V moves exactly), or None where a span has none.
fn split_chain(decode: &[&Node], nodes: &[&Node], req: &PlacementRequest) -> Option<Chain> {
    if !decode.iter().all(|d| matches!(d.role, Role::Decode | Role::Both)) {
        return None;
    }
    let prefill: Vec<&Node> = decode
        .iter()
        .map(|d| {
            nodes
                .iter()
                .filter(|p| {
                    matches!(p.role, Role::Prefill | Role::Both)
                        && p.peer != d.peer
                        && p.model.layer_span() == d.model.layer_span()
                        && p.model.kv_dtype == d.model.kv_dtype
                })
                .min_by(|a, b| a.prefill_s(req.prompt_tokens).total_cmp(&b.prefill_s(req.prompt_tokens)).then(a.peer.cmp(&b.peer)))
                .copied()
        })
        .collect::<Option<_>>()?;
    let colocated = chain(decode, req);
    let hops_s = prefill.len() as f64 * HIDDEN_HOP_S;
    // Each span's K/V moves while later spans compute; what shows is the last span's transfer,
    // and whatever of the others a slow link cannot hide.
    let mut ttft = hops_s + SPLIT_OVERHEAD_S;
    let (mut exposed_s, mut last_s): (f64, f64) = (0.0, 0.0);
    for (p, d) in prefill.iter().zip(decode) {
        let compute_s = p.prefill_s(req.prompt_tokens) * p.share();
        last_s = req.prompt_tokens as f64 * p.model.kv_bytes_per_token as f64 * p.share() / d.link_from(&p.peer);
        ttft += compute_s;
        exposed_s = exposed_s.max(last_s - compute_s);
        if p.lacks_room(req.prompt_tokens) {
            ttft += NO_ROOM_S;
        }
    }
    ttft += exposed_s + last_s;
    if decode.iter().any(|d| d.lacks_room(req.prompt_tokens + req.output_tokens)) {
        ttft += NO_ROOM_S;
    }
    Some(Chain {
        prefill: Some(prefill.iter().map(|n| Stage { peer: n.peer, is_self: n.is_self, layers: n.model.layer_span() }).collect()),
        expected_ttft_s: ttft,
        ..colocated
    })
}

/// Extends `path` (stages of `nodes` tiling `0..at`) by every node whose span starts at `at`,
/// recording each tiling that reaches `end` in `found`.
fn tile(nodes: &[&Node], at: u32, end: u32, path: &mut Vec<usize>, found: &mut Vec<Vec<usize>>, tries: &mut usize) {
    if at == end {
        found.push(path.clone());
        return;
    }
    // Longer spans first (fewer stages, fewer hops), then faster nodes: the bound cuts the
    // worse tilings.
    let mut next: Vec<usize> = (0..nodes.len())
        .filter(|&i| {
            let [start, stop] = nodes[i].model.layer_span();
            start == at && at < stop && stop <= end
        })
        .collect();
    next.sort_by(|&i, &j| {
        let (a, b) = (nodes[i], nodes[j]);
        b.model.layer_span()[1].cmp(&a.model.layer_span()[1]).then(a.step_s.total_cmp(&b.step_s)).then(a.peer.cmp(&b.peer))
    });
    for i in next {
        if found.len() >= MAX_CHAINS || *tries == 0 {
            return;
        }
        *tries -= 1;
        path.push(i);
        tile(nodes, nodes[i].model.layer_span()[1], end, path, found, tries);
        path.pop();
    }
}

/// Every chain of usable nodes holding spans of the model that tile its layers, best first.
/// The stages of a chain compute the same tokens as one node would: one fingerprint, one kernel
/// mode. A node holding the whole model is no stage ([`place`] has it).
pub fn chains(view: &ClusterView, req: &PlacementRequest) -> Vec<Chain> {
    let mut nodes: Vec<Node> = view
        .nodes()
        .filter_map(|(peer, node)| usable(view, req, peer, node))
        .filter(|n| !n.model.holds_all() && n.model.layers > 0)
        .collect();
    nodes.sort_by_key(|n| n.peer);
    let group = |n: &Node| (n.model.fingerprint.clone(), n.model.deterministic, n.model.layers);
    let mut groups: Vec<_> = nodes.iter().map(group).collect();
    groups.sort();
    groups.dedup();
    let mut out = Vec::new();
    for g in groups {
        let members: Vec<&Node> = nodes.iter().filter(|n| group(n) == g).collect();
        let (mut found, mut tries) = (Vec::new(), MAX_STAGE_TRIES);
        tile(&members, 0, g.2, &mut Vec::new(), &mut found, &mut tries);
        for path in &found {
            let stages: Vec<&Node> = path.iter().map(|&i| members[i]).collect();
            if req.mode != PlacementMode::Split {
                out.push(chain(&stages, req));
            }
            if req.mode != PlacementMode::Colocated {
                out.extend(split_chain(&stages, &members, req));
            }
        }
    }
    if out.is_empty() && req.mode == PlacementMode::Split {
        // Nobody to split with: the chains still serve it.
        return chains(view, &PlacementRequest { mode: PlacementMode::Colocated, ..req.clone() });
    }
    let key =
        |c: &Chain| (c.stages.iter().map(|s| s.peer).collect::<Vec<_>>(), c.prefill.iter().flatten().map(|s| s.peer).collect::<Vec<_>>());
    out.sort_by(|a, b| a.score(req.output_tokens).total_cmp(&b.score(req.output_tokens)).then_with(|| key(a).cmp(&key(b))));
    out
}

/// For a node about to load `want_layers` layers of an `n_layers`-layer model (`--layers auto`):
/// the span with the least throughput from other nodes, as Petals' servers choose their blocks:
/// each holder of a layer adds its memory bandwidth (decode is memory-bound), a node holding the
/// whole model holding every layer. Only spans that start or end where another node's span
/// does (or at the model's ends) are candidates, since chains tile spans end to end; the least
/// throughput per layer wins, then the longer span, then the lower. This node's own ad does not
/// count: it is choosing its span.
pub fn span_lacked_most(view: &ClusterView, model_id: &str, n_layers: u32, want_layers: u32) -> [u32; 2] {
    let want = want_layers.clamp(1, n_layers.max(1)).min(n_layers) as usize;
    let n = n_layers as usize;
    let mut held = vec![0.0f64; n];
    let mut bounds = vec![0, n];
    for ad in view.nodes().filter(|(p, _)| **p != view.self_id()).filter_map(|(_, n)| n.ad.as_ref()) {
        // Another layer count is another model under the same name.
        let Some(m) = ad.models.iter().find(|m| m.id == model_id && m.layers == n_layers) else {
            continue;
        };
        let [start, end] = m.layer_span();
        let rate = ad.speed.gbps.clamp(1e-3, 1e6);
        held.iter_mut().take(end as usize).skip(start as usize).for_each(|h| *h += rate);
        bounds.extend([start as usize, end as usize]);
    }
    bounds.sort_unstable();
    bounds.dedup();
    let candidates = bounds.iter().flat_map(|&b| {
        let from = (b < n).then(|| b..(b + want).min(n));
        let to = (b > 0).then(|| b.saturating_sub(want)..b);
        from.into_iter().chain(to)
    });
    let per_layer = |r: &std::ops::Range<usize>| held[r.clone()].iter().sum::<f64>() / r.len() as f64;
    let best = candidates
        .min_by(|a, b| per_layer(a).total_cmp(&per_layer(b)).then(b.len().cmp(&a.len())).then(a.start.cmp(&b.start)))
        .unwrap_or(0..want);
    [best.start as u32, best.end as u32]
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
        add_ad(v, peer, role, Speed { gflops, gbps: 100.0 }, load, model);
    }

    fn add_ad(v: &mut ClusterView, peer: PeerId, role: Role, speed: Speed, load: LoadReport, model: ModelAd) {
        let ad = CapabilityAd { peer_id: peer.to_string(), role, speed, models: vec![model], ..Default::default() };
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

    fn spanning(start: u32, end: u32) -> ModelAd {
        ModelAd { span: Some([start, end]), ..model() }
    }

    /// A node of `gbps` holding `model`.
    fn add_span(v: &mut ClusterView, peer: PeerId, gbps: f64, model: ModelAd) {
        add_ad(v, peer, Role::Both, Speed { gflops: 1000.0, gbps }, idle(), model);
    }

    fn request(exclude: &[PeerId]) -> PlacementRequest<'_> {
        PlacementRequest { model: "m", prompt_tokens: 500, output_tokens: 100, affinity: None, exclude, mode: PlacementMode::Auto }
    }

    fn chain_peers(v: &ClusterView, exclude: &[PeerId]) -> Vec<Vec<PeerId>> {
        chains(v, &request(exclude)).into_iter().map(|c| c.stages.into_iter().map(|s| s.peer).collect()).collect()
    }

    #[test]
    fn a_node_holding_part_of_the_model_is_never_a_plain_placement() {
        let me = PeerId::random();
        let (part, whole) = (PeerId::random(), PeerId::random());
        let mut v = ClusterView::new(me, Duration::from_secs(5));
        add_span(&mut v, part, 1e4, spanning(0, 20));
        assert!(order(&v, &request(&[])).is_empty(), "nobody holds every layer");
        // A span of every layer is the whole model.
        add_span(&mut v, whole, 100.0, spanning(0, 30));
        for mode in [PlacementMode::Auto, PlacementMode::Colocated, PlacementMode::Split] {
            let p = place(&v, &PlacementRequest { mode, ..request(&[]) });
            assert!(p.iter().all(|p| p.peer == whole && p.prefill.is_none()), "{mode:?}: {p:?}");
            assert!(!p.is_empty());
        }
        // And the whole-model node is no chain of one.
        assert!(chains(&v, &request(&[])).is_empty());
    }

    #[test]
    fn spans_that_tile_the_model_make_one_chain_in_layer_order() {
        let me = PeerId::random();
        let (a, b, c) = (PeerId::random(), PeerId::random(), PeerId::random());
        let mut v = ClusterView::new(me, Duration::from_secs(5));
        add_span(&mut v, c, 100.0, spanning(20, 30));
        add_span(&mut v, a, 100.0, spanning(0, 10));
        add_span(&mut v, me, 100.0, model()); // the whole model: never a stage
        assert!(chains(&v, &request(&[])).is_empty(), "layers 10..20 are held by nobody");
        add_span(&mut v, b, 100.0, spanning(10, 20));
        let found = chains(&v, &request(&[]));
        assert_eq!(found.len(), 1);
        let stages: Vec<(PeerId, [u32; 2])> = found[0].stages.iter().map(|s| (s.peer, s.layers)).collect();
        assert_eq!(stages, [(a, [0, 10]), (b, [10, 20]), (c, [20, 30])]);
        assert_eq!(found[0].fingerprint, "f");
        assert!(found[0].stages.iter().all(|s| !s.is_self));
        // A third of the model each on equal nodes: one node's step time, plus a hop per stage.
        let step_s = 100e6 / 100e9;
        assert!((found[0].expected_tpot_s - (step_s + 3.0 * HIDDEN_HOP_S)).abs() < 1e-9, "{}", found[0].expected_tpot_s);
        assert!(found[0].expected_ttft_s > found[0].expected_tpot_s);
    }

    #[test]
    fn the_faster_of_two_candidates_for_a_span_leads() {
        let me = PeerId::random();
        let (a, fast, slow, c) = (PeerId::random(), PeerId::random(), PeerId::random(), PeerId::random());
        let mut v = ClusterView::new(me, Duration::from_secs(5));
        add_span(&mut v, a, 100.0, spanning(0, 10));
        add_span(&mut v, slow, 10.0, spanning(10, 20));
        add_span(&mut v, fast, 1000.0, spanning(10, 20));
        add_span(&mut v, c, 100.0, spanning(20, 30));
        assert_eq!(chain_peers(&v, &[]), [vec![a, fast, c], vec![a, slow, c]]);
        // A stage spanning two others' layers saves a hop.
        add_span(&mut v, me, 100.0, spanning(10, 30));
        let found = chains(&v, &request(&[]));
        assert_eq!(found.len(), 3);
        let short: Vec<_> = found.iter().filter(|c| c.stages.len() == 2).collect();
        assert_eq!(short.len(), 1);
        assert!(short[0].stages[1].is_self && short[0].stages[1].layers == [10, 30]);
        // Equal chains come in one order, call after call.
        let twin = PeerId::random();
        add_span(&mut v, twin, 1000.0, spanning(10, 20));
        let first = chain_peers(&v, &[]);
        assert!((0..5).all(|_| chain_peers(&v, &[]) == first));
    }

    #[test]
    fn excluded_draining_and_unusable_stages_are_skipped() {
        let me = PeerId::random();
        let (a, fast, slow, c) = (PeerId::random(), PeerId::random(), PeerId::random(), PeerId::random());
        let mut v = ClusterView::new(me, Duration::from_secs(5));
        add_span(&mut v, a, 100.0, spanning(0, 10));
        add_span(&mut v, fast, 1000.0, spanning(10, 20));
        add_span(&mut v, slow, 10.0, spanning(10, 20));
        add_span(&mut v, c, 100.0, spanning(20, 30));
        assert_eq!(chain_peers(&v, &[fast]), [vec![a, slow, c]]);
        add_ad(&mut v, slow, Role::Both, Speed { gflops: 1000.0, gbps: 10.0 }, LoadReport { draining: true, ..idle() }, spanning(10, 20));
        assert!(chain_peers(&v, &[fast]).is_empty());
        assert_eq!(chain_peers(&v, &[]), [vec![a, fast, c]]);
        add_ad(&mut v, fast, Role::Observer, Speed { gflops: 1000.0, gbps: 1000.0 }, idle(), spanning(10, 20));
        assert!(chain_peers(&v, &[]).is_empty(), "an observer serves nothing");
        add_span(&mut v, fast, 1000.0, spanning(10, 20));
        v.distrust(c, "m", "fingerprint mismatch");
        assert!(chain_peers(&v, &[]).is_empty());
    }

    #[test]
    fn stages_of_other_fingerprints_or_kernel_modes_never_mix() {
        let me = PeerId::random();
        let (a, b, c, d) = (PeerId::random(), PeerId::random(), PeerId::random(), PeerId::random());
        let mut v = ClusterView::new(me, Duration::from_secs(5));
        add_span(&mut v, a, 100.0, spanning(0, 10));
        add_span(&mut v, b, 100.0, ModelAd { fingerprint: "g".into(), ..spanning(10, 20) });
        add_span(&mut v, c, 100.0, spanning(20, 30));
        add_span(&mut v, d, 100.0, ModelAd { deterministic: true, ..spanning(10, 20) });
        assert!(chains(&v, &request(&[])).is_empty());
        // A whole chain of the other fingerprint is fine, as is one of ours.
        add_span(&mut v, me, 100.0, ModelAd { fingerprint: "g".into(), ..spanning(0, 10) });
        let e = PeerId::random();
        add_span(&mut v, e, 100.0, ModelAd { fingerprint: "g".into(), ..spanning(20, 30) });
        let found = chains(&v, &request(&[]));
        assert_eq!(found.len(), 1);
        assert_eq!((found[0].fingerprint.as_str(), found[0].stages.iter().map(|s| s.peer).collect::<Vec<_>>()), ("g", vec![me, b, e]));
        // With a partner in our kernel mode, ours chains too; each chain keeps to its own.
        add_span(&mut v, d, 100.0, spanning(10, 20));
        let found: Vec<(String, Vec<PeerId>)> =
            chains(&v, &request(&[])).into_iter().map(|c| (c.fingerprint, c.stages.into_iter().map(|s| s.peer).collect())).collect();
        assert_eq!(found.len(), 2);
        assert!(found.contains(&("f".into(), vec![a, d, c])) && found.contains(&("g".into(), vec![me, b, e])), "{found:?}");
    }

    #[test]
    fn the_search_for_chains_is_bounded() {
        let me = PeerId::random();
        let mut v = ClusterView::new(me, Duration::from_secs(5));
        // Ten nodes for each of ten spans: 10^10 tilings.
        for l in 0..10 {
            for _ in 0..10 {
                add_span(&mut v, PeerId::random(), 100.0, ModelAd { layers: 10, ..spanning(l, l + 1) });
            }
        }
        let found = chains(&v, &request(&[]));
        // Each tiling once as it is and once split (every node may prefill and decode).
        assert_eq!(found.len(), 2 * MAX_CHAINS);
        assert!(found.iter().all(|c| c.stages.len() == 10));
        assert_eq!(chains(&v, &PlacementRequest { mode: PlacementMode::Colocated, ..request(&[]) }).len(), MAX_CHAINS);
    }

    #[test]
    fn a_chain_of_decode_nodes_splits_with_prefill_nodes_of_the_same_spans() {
        let me = PeerId::random();
        let (pa, pb, da, db) = (PeerId::random(), PeerId::random(), PeerId::random(), PeerId::random());
        let mut v = ClusterView::new(me, Duration::from_secs(5));
        // Compute-rich prefill nodes, bandwidth-rich decode nodes.
        let (speed, decode_speed) = (Speed { gflops: 4000.0, gbps: 50.0 }, Speed { gflops: 1000.0, gbps: 100.0 });
        add_ad(&mut v, pa, Role::Prefill, speed, idle(), spanning(0, 15));
        add_ad(&mut v, pb, Role::Prefill, speed, idle(), spanning(15, 30));
        add_ad(&mut v, da, Role::Decode, decode_speed, idle(), spanning(0, 15));
        add_ad(&mut v, db, Role::Decode, decode_speed, idle(), spanning(15, 30));
        let ask = |v: &ClusterView, mode, prompt_tokens| chains(v, &PlacementRequest { mode, prompt_tokens, ..request(&[]) });
        let peers = |s: &[Stage]| s.iter().map(|s| s.peer).collect::<Vec<_>>();

        let split = ask(&v, PlacementMode::Split, 2000);
        assert_eq!(split.len(), 1, "{split:?}");
        assert_eq!(peers(&split[0].stages), [da, db], "decode nodes decode");
        assert_eq!(peers(split[0].prefill.as_deref().expect("split")), [pa, pb], "prefill nodes of the same spans prefill");
        assert!(ask(&v, PlacementMode::Colocated, 2000).iter().all(|c| c.prefill.is_none()));
        // Long prompts pay for the split; the very shortest do not.
        assert!(ask(&v, PlacementMode::Auto, 2000)[0].prefill.is_some());
        assert!(ask(&v, PlacementMode::Auto, 4)[0].prefill.is_none());
        // A span without a prefill node of its K/V dtype: no split, and Split falls back to a chain.
        add_ad(&mut v, pb, Role::Prefill, speed, idle(), ModelAd { kv_dtype: "f32".into(), ..spanning(15, 30) });
        assert!(ask(&v, PlacementMode::Auto, 2000).iter().all(|c| c.prefill.is_none()));
        assert!(!ask(&v, PlacementMode::Split, 2000).is_empty());
    }

    #[test]
    fn a_new_node_takes_the_span_the_others_hold_least() {
        let me = PeerId::random();
        let mut v = ClusterView::new(me, Duration::from_secs(5));
        assert_eq!(span_lacked_most(&v, "m", 30, 10), [0, 10], "nobody holds any: the first");
        add_span(&mut v, PeerId::random(), 100.0, spanning(0, 10));
        assert_eq!(span_lacked_most(&v, "m", 30, 10), [10, 20]);
        assert_eq!(span_lacked_most(&v, "m", 30, 15), [10, 25]);
        add_span(&mut v, PeerId::random(), 100.0, spanning(10, 20));
        assert_eq!(span_lacked_most(&v, "m", 30, 10), [20, 30]);
        // A whole-model node holds every layer alike; this node's own ad does not count.
        add_span(&mut v, PeerId::random(), 100.0, model());
        add_span(&mut v, me, 100.0, spanning(20, 30));
        assert_eq!(span_lacked_most(&v, "m", 30, 10), [20, 30]);
        add_span(&mut v, PeerId::random(), 100.0, spanning(20, 30));
        assert_eq!(span_lacked_most(&v, "m", 30, 10), [0, 10], "held alike everywhere: the lowest");
        // Other models, or another layer count under the same name, do not count.
        add_span(&mut v, PeerId::random(), 100.0, ModelAd { id: "other".into(), ..spanning(0, 10) });
        add_span(&mut v, PeerId::random(), 100.0, ModelAd { layers: 40, ..spanning(0, 10) });
        assert_eq!(span_lacked_most(&v, "m", 30, 10), [0, 10]);
        assert_eq!(span_lacked_most(&v, "m", 30, 50), [0, 30], "at most the whole model");
        // Throughput, not heads: a slow holder of 10..20 leaves it lacking more than 0..10.
        let mut v = ClusterView::new(me, Duration::from_secs(5));
        add_span(&mut v, PeerId::random(), 100.0, spanning(0, 10));
        add_span(&mut v, PeerId::random(), 100.0, spanning(20, 30));
        add_span(&mut v, PeerId::random(), 5.0, spanning(10, 20));
        add_span(&mut v, PeerId::random(), 5.0, spanning(10, 20));
        assert_eq!(span_lacked_most(&v, "m", 30, 10), [10, 20]);
        assert_eq!(span_lacked_most(&v, "m", 30, 0), [10, 11], "at least a layer");
        assert_eq!(span_lacked_most(&v, "m", 0, 4), [0, 0]);
        // Spans abut others' ends, so chains can tile them: 16 layers beside one holder of
        // 0..15 are 15..30, not 14..30.
        let mut v = ClusterView::new(me, Duration::from_secs(5));
        add_span(&mut v, PeerId::random(), 100.0, spanning(0, 15));
        assert_eq!(span_lacked_most(&v, "m", 30, 16), [15, 30]);
        add_span(&mut v, PeerId::random(), 100.0, spanning(15, 30));
        add_span(&mut v, PeerId::random(), 100.0, spanning(0, 15));
        assert_eq!(span_lacked_most(&v, "m", 30, 20), [15, 30], "the less held half, whole");
    }
}
