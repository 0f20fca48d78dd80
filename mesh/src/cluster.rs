//! The cluster as one node sees it: every node heard of (itself included), its latest ad and load
//! report, whether we hold a direct connection to it, and a bounded log of mesh events. Updated by
//! the swarm task; read by placement, the HTTP API (`/v1/cluster`) and the console.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use libp2p::PeerId;
use serde::{Deserialize, Serialize};

use crate::messages::{CapabilityAd, GossipMessage, LoadReport};

/// Mesh events kept for the cluster view.
const EVENT_LOG: usize = 256;
/// Refusals kept beside them: strangers can cause refusals at will, so they have a log of their
/// own and never push the rest (joins, leaves, failures) out.
const REFUSED_EVENTS: usize = 64;

/// What happened in the mesh.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum MeshEventKind {
    Joined,
    Left,
    Lost,
    RoleChanged,
    Refused,
    Distrusted,
    Rerouted,
    /// An operator's command (role, drain) was carried out.
    Control,
}

/// One entry of the event log.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct MeshEvent {
    /// Unix time in milliseconds.
    pub at_ms: u64,
    pub kind: MeshEventKind,
    pub peer_id: String,
    pub detail: String,
}

/// One node in the view.
#[derive(Clone, Debug)]
pub struct NodeState {
    pub ad: Option<CapabilityAd>,
    pub load: Option<LoadReport>,
    pub connected: bool,
    pub last_heard: Instant,
}

/// The view of the cluster.
#[derive(Debug)]
pub struct ClusterView {
    self_id: PeerId,
    nodes: HashMap<PeerId, NodeState>,
    events: VecDeque<MeshEvent>,
    /// Refusals, kept apart so that however many there are, they push no other event out.
    refusals: VecDeque<MeshEvent>,
    /// A node not heard from for this long is gone.
    timeout: Duration,
    /// Models whose advertised fingerprint a request proved false, per peer.
    distrusted: HashMap<PeerId, BTreeSet<String>>,
    /// What this node recorded itself (failures, re-placements) since its last load report.
    outbox: VecDeque<MeshEvent>,
}

/// Peers (and models per peer) remembered as having lied; beyond it no more are recorded.
const DISTRUSTED_PEERS: usize = 1024;

/// A node as `/v1/cluster` shows it.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct NodeSnapshot {
    pub peer_id: String,
    #[serde(rename = "self")]
    pub is_self: bool,
    pub connected: bool,
    pub last_heard_ms: u64,
    pub role: Option<crate::roles::Role>,
    pub auto_role: bool,
    pub version: Option<String>,
    pub adapter: Option<crate::messages::AdapterAd>,
    pub speed: Option<crate::messages::Speed>,
    pub models: Vec<crate::messages::ModelAd>,
    pub http: Option<String>,
    pub addresses: Vec<String>,
    pub load: Option<LoadReport>,
    pub distrusted_models: Vec<String>,
}

/// A link between two nodes (a direct connection one of them reports).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Link {
    pub a: String,
    pub b: String,
}

/// The whole view, as `/v1/cluster` returns it.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct ClusterSnapshot {
    #[serde(rename = "self")]
    pub self_id: String,
    pub nodes: Vec<NodeSnapshot>,
    pub links: Vec<Link>,
    pub events: Vec<MeshEvent>,
    /// The best chains of nodes holding spans of a model, per model, as placement ranks them
    /// for a typical request (512 prompt tokens, 128 out).
    #[serde(default)]
    pub chains: Vec<ChainSnapshot>,
}

/// A chain as `/v1/cluster` shows it: which node runs which layers, in order.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct ChainSnapshot {
    pub model: String,
    pub fingerprint: String,
    pub stages: Vec<StageSnapshot>,
    /// A split chain's prefill stages (empty when the decode stages prefill too).
    #[serde(default)]
    pub prefill: Vec<StageSnapshot>,
    pub expected_ttft_ms: f64,
    pub expected_tpot_ms: f64,
}

/// One stage of a chain: a node and its layers `[start, end)`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct StageSnapshot {
    pub peer_id: String,
    pub layers: [u32; 2],
}

/// Chains shown per model.
const CHAINS_SHOWN: usize = 4;

/// The end of a peer id, as people tell them apart.
pub fn short(peer: &str) -> &str {
    peer.get(peer.len().saturating_sub(6)..).unwrap_or(peer)
}

/// Unix time in milliseconds (0 on a clock before 1970).
pub fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

impl ClusterView {
    pub fn new(self_id: PeerId, timeout: Duration) -> Self {
        let mut view = ClusterView {
            self_id,
            nodes: HashMap::new(),
            events: VecDeque::new(),
            refusals: VecDeque::new(),
            timeout,
            distrusted: HashMap::new(),
            outbox: VecDeque::new(),
        };
        view.nodes.insert(self_id, NodeState { ad: None, load: None, connected: true, last_heard: Instant::now() });
        view
    }

    pub fn self_id(&self) -> PeerId {
        self.self_id
    }

    fn log(&mut self, kind: MeshEventKind, peer: impl ToString, detail: impl Into<String>) {
        let (peer, detail) = (peer.to_string(), detail.into());
        tracing::info!(%peer, ?kind, %detail, "mesh event");
        self.push_event(MeshEvent { at_ms: unix_ms(), kind, peer_id: peer, detail });
    }

    fn push_event(&mut self, e: MeshEvent) {
        let (log, bound) =
            if e.kind == MeshEventKind::Refused { (&mut self.refusals, REFUSED_EVENTS) } else { (&mut self.events, EVENT_LOG) };
        if log.len() == bound {
            log.pop_front();
        }
        log.push_back(e);
    }

    /// Records something outside the view's own bookkeeping (a refused connection, a re-placed
    /// request); `peer` is a peer id or, before one is known, an address. Refusals stay in this
    /// node's log; the rest goes out with the next load report.
    pub fn record(&mut self, kind: MeshEventKind, peer: impl ToString, detail: impl Into<String>) {
        self.log(kind, peer, detail);
        if kind == MeshEventKind::Refused {
            return;
        }
        if self.outbox.len() == crate::messages::MAX_REPORTED_EVENTS {
            self.outbox.pop_front();
        }
        self.outbox.extend(self.events.back().cloned());
    }

    /// The events this node recorded itself since the last call, for its load report: other
    /// nodes and the console see the mesh's joins and leaves themselves, but not a failure on a
    /// stream they were not part of.
    pub fn take_reported(&mut self) -> Vec<MeshEvent> {
        self.outbox.drain(..).collect()
    }

    fn entry(&mut self, peer: PeerId, now: Instant) -> &mut NodeState {
        self.nodes.entry(peer).or_insert_with(|| NodeState { ad: None, load: None, connected: false, last_heard: now })
    }

    /// Takes a checked gossip message from `from` (the gossipsub source, which signed it).
    /// Returns an error, and changes nothing, if the message speaks for another peer.
    pub fn apply(&mut self, from: PeerId, msg: GossipMessage, now: Instant) -> Result<(), String> {
        if msg.peer_id() != from.to_string() {
            return Err(format!("{from} sent a message for {}", msg.peer_id()));
        }
        if from == self.self_id {
            return Ok(());
        }
        match msg {
            GossipMessage::Leaving { reason, .. } => {
                if self.nodes.remove(&from).is_some() {
                    self.log(MeshEventKind::Left, from, reason);
                }
            }
            GossipMessage::Capability(ad) => {
                let known = self.nodes.get(&from).and_then(|n| n.ad.as_ref().map(|a| a.role));
                match known {
                    None => {
                        let models: Vec<&str> = ad.models.iter().map(|m| m.id.as_str()).collect();
                        self.log(MeshEventKind::Joined, from, format!("role {}, models {models:?}", ad.role));
                    }
                    Some(old) if old != ad.role => self.log(MeshEventKind::RoleChanged, from, format!("{old} -> {}", ad.role)),
                    Some(_) => {}
                }
                let node = self.entry(from, now);
                node.ad = Some(ad);
                node.last_heard = now;
            }
            GossipMessage::Load(load) => {
                // Refusals are the reporting node's own business (and a flood of them must not
                // reach every node's log). A node speaks only for itself: an event it reports
                // about another is logged as its own report, never as that node's.
                let reporter = from.to_string();
                for e in load.events.iter().filter(|e| e.kind != MeshEventKind::Refused) {
                    let detail = if e.peer_id == reporter {
                        format!("{} (reported by {})", e.detail, short(&reporter))
                    } else {
                        format!("{} (reported by {} about {})", e.detail, short(&reporter), short(&e.peer_id))
                    };
                    self.push_event(MeshEvent { peer_id: reporter.clone(), detail, ..e.clone() });
                }
                let node = self.entry(from, now);
                node.load = Some(load);
                node.last_heard = now;
            }
        }
        Ok(())
    }

    /// This node's own ad and load, as it publishes them.
    pub fn set_own(&mut self, ad: Option<CapabilityAd>, load: Option<LoadReport>) {
        let now = Instant::now();
        let me = self.self_id;
        let node = self.entry(me, now);
        if ad.is_some() {
            node.ad = ad;
        }
        if load.is_some() {
            node.load = load;
        }
        node.connected = true;
        node.last_heard = now;
    }

    /// A direct connection to `peer` is up.
    pub fn connected(&mut self, peer: PeerId, now: Instant) {
        let node = self.entry(peer, now);
        node.connected = true;
        node.last_heard = now;
    }

    /// The last direct connection to `peer` closed: it cannot take requests from us, and unless it
    /// is heard of again it is gone.
    pub fn disconnected(&mut self, peer: PeerId, why: &str) {
        if let Some(node) = self.nodes.remove(&peer)
            && node.ad.is_some()
        {
            self.log(MeshEventKind::Lost, peer, format!("connection closed: {why}"));
        }
    }

    /// Forgets nodes not heard from within the timeout; returns them.
    pub fn expire(&mut self, now: Instant) -> Vec<PeerId> {
        let me = self.self_id;
        let timeout = self.timeout;
        let gone: Vec<PeerId> =
            self.nodes.iter().filter(|(p, n)| **p != me && now.duration_since(n.last_heard) > timeout).map(|(p, _)| *p).collect();
        for p in &gone {
            if self.nodes.remove(p).is_some_and(|n| n.ad.is_some()) {
                self.log(MeshEventKind::Lost, *p, format!("silent for {timeout:?}"));
            }
        }
        gone
    }

    /// Stops routing `model` to `peer`: a request showed its ad's fingerprint to be false.
    /// Kept apart from the node's entry, so that a reconnect does not restore trust.
    pub fn distrust(&mut self, peer: PeerId, model: &str, detail: &str) {
        if self.distrusted.len() >= DISTRUSTED_PEERS && !self.distrusted.contains_key(&peer) {
            return;
        }
        let models = self.distrusted.entry(peer).or_default();
        if models.len() < DISTRUSTED_PEERS && models.insert(model.to_string()) {
            self.log(MeshEventKind::Distrusted, peer, format!("{model}: {detail}"));
        }
    }

    /// Whether a request proved `peer`'s ad for `model` false.
    pub fn is_distrusted(&self, peer: &PeerId, model: &str) -> bool {
        self.distrusted.get(peer).is_some_and(|m| m.contains(model))
    }

    /// Every node, this one included.
    pub fn nodes(&self) -> impl Iterator<Item = (&PeerId, &NodeState)> {
        self.nodes.iter()
    }

    pub fn node(&self, peer: &PeerId) -> Option<&NodeState> {
        self.nodes.get(peer)
    }

    /// Peers with a direct connection, for the load report's link list.
    pub fn connected_peers(&self) -> Vec<PeerId> {
        self.nodes.iter().filter(|(p, n)| **p != self.self_id && n.connected).map(|(p, _)| *p).collect()
    }

    /// The serializable form, nodes in peer-id order with this node first.
    pub fn snapshot(&self) -> ClusterSnapshot {
        let now = Instant::now();
        let mut nodes: Vec<NodeSnapshot> = self
            .nodes
            .iter()
            .map(|(p, n)| {
                let ad = n.ad.as_ref();
                NodeSnapshot {
                    peer_id: p.to_string(),
                    is_self: *p == self.self_id,
                    connected: n.connected,
                    last_heard_ms: now.duration_since(n.last_heard).as_millis() as u64,
                    role: ad.map(|a| a.role),
                    auto_role: ad.is_some_and(|a| a.auto_role),
                    version: ad.map(|a| a.version.clone()),
                    adapter: ad.and_then(|a| a.adapter.clone()),
                    speed: ad.map(|a| a.speed),
                    models: ad.map(|a| a.models.clone()).unwrap_or_default(),
                    http: ad.and_then(|a| a.http.clone()),
                    addresses: ad.map(|a| a.addresses.clone()).unwrap_or_default(),
                    load: n.load.clone(),
                    distrusted_models: self.distrusted.get(p).map(|m| m.iter().cloned().collect()).unwrap_or_default(),
                }
            })
            .collect();
        nodes.sort_by(|a, b| b.is_self.cmp(&a.is_self).then_with(|| a.peer_id.cmp(&b.peer_id)));
        let known: BTreeSet<&str> = nodes.iter().map(|n| n.peer_id.as_str()).collect();
        let mut links = BTreeSet::new();
        for n in &nodes {
            let peers: Vec<String> = if n.is_self {
                self.connected_peers().iter().map(ToString::to_string).collect()
            } else {
                n.load.as_ref().map(|l| l.peers.clone()).unwrap_or_default()
            };
            for p in peers.iter().filter(|p| known.contains(p.as_str())) {
                let (a, b) = if n.peer_id < *p { (n.peer_id.clone(), p.clone()) } else { (p.clone(), n.peer_id.clone()) };
                links.insert(Link { a, b });
            }
        }
        let models: BTreeSet<&str> = nodes.iter().flat_map(|n| &n.models).filter(|m| !m.holds_all()).map(|m| m.id.as_str()).collect();
        let stages = |s: &[crate::placement::Stage]| {
            s.iter().map(|s| StageSnapshot { peer_id: s.peer.to_string(), layers: s.layers }).collect::<Vec<_>>()
        };
        let chains = models
            .into_iter()
            .flat_map(|model| {
                let req = crate::placement::PlacementRequest {
                    model,
                    prompt_tokens: 512,
                    output_tokens: 128,
                    affinity: None,
                    exclude: &[],
                    mode: crate::placement::PlacementMode::Auto,
                };
                crate::placement::chains(self, &req).into_iter().take(CHAINS_SHOWN).map(move |c| ChainSnapshot {
                    model: model.to_string(),
                    fingerprint: c.fingerprint,
                    stages: stages(&c.stages),
                    prefill: c.prefill.as_deref().map(stages).unwrap_or_default(),
                    expected_ttft_ms: c.expected_ttft_s * 1e3,
                    expected_tpot_ms: c.expected_tpot_s * 1e3,
                })
            })
            .collect();
        ClusterSnapshot {
            self_id: self.self_id.to_string(),
            nodes,
            links: links.into_iter().collect(),
            chains,
            events: {
                let mut all: Vec<MeshEvent> = self.events.iter().chain(&self.refusals).cloned().collect();
                all.sort_by_key(|e| e.at_ms);
                all
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::roles::Role;

    fn ad(peer: PeerId, role: Role) -> GossipMessage {
        GossipMessage::Capability(CapabilityAd { peer_id: peer.to_string(), role, ..Default::default() })
    }

    #[test]
    fn the_view_tracks_joins_role_changes_leaves_and_silence() {
        let me = PeerId::random();
        let (b, c) = (PeerId::random(), PeerId::random());
        let mut v = ClusterView::new(me, Duration::from_secs(5));
        let t0 = Instant::now();
        v.apply(b, ad(b, Role::Both), t0).expect("ad");
        v.apply(c, ad(c, Role::Decode), t0).expect("ad");
        v.connected(b, t0);
        assert_eq!(v.snapshot().nodes.len(), 3);
        assert!(v.apply(b, ad(c, Role::Prefill), t0).is_err(), "b may not speak for c");
        v.apply(b, ad(b, Role::Prefill), t0).expect("flip");
        v.apply(
            c,
            GossipMessage::Load(LoadReport { peer_id: c.to_string(), peers: vec![b.to_string(), "unknown".into()], ..Default::default() }),
            t0 + Duration::from_secs(4),
        )
        .expect("load");
        let snap = v.snapshot();
        assert!(snap.nodes[0].is_self);
        assert_eq!(snap.links.len(), 2, "me-b (mine) and b-c (c's report); unknown peers are left out: {:?}", snap.links);
        assert_eq!(v.expire(t0 + Duration::from_secs(6)), vec![b], "b silent for 6 s, c heard at 4 s");
        v.apply(c, GossipMessage::Leaving { peer_id: c.to_string(), reason: "shutdown".into() }, t0).expect("leaving");
        let kinds: Vec<MeshEventKind> = v.snapshot().events.iter().map(|e| e.kind).collect();
        use MeshEventKind::*;
        assert_eq!(kinds, [Joined, Joined, RoleChanged, Lost, Left]);
        assert_eq!(v.snapshot().nodes.len(), 1, "only this node is left");
    }

    #[test]
    fn refusals_stay_local_and_never_push_other_events_out() {
        let me = PeerId::random();
        let b = PeerId::random();
        let mut v = ClusterView::new(me, Duration::from_secs(5));
        v.apply(b, ad(b, Role::Both), Instant::now()).expect("ad");
        for i in 0..1000 {
            v.record(MeshEventKind::Refused, format!("/ip4/10.0.{}.{}/tcp/1", i / 256, i % 256), "garbage");
        }
        v.record(MeshEventKind::Rerouted, b, "a failure to report");
        let events = v.snapshot().events;
        let refused = events.iter().filter(|e| e.kind == MeshEventKind::Refused).count();
        assert_eq!(refused, REFUSED_EVENTS, "refusals are capped");
        assert!(events.iter().any(|e| e.kind == MeshEventKind::Joined), "the join survived: {events:?}");
        let reported = v.take_reported();
        assert_eq!(reported.len(), 1, "only the failure goes out with the load report: {reported:?}");

        // A load report carrying refusals (an older node's, or a forged one) adds none here.
        let mut other = ClusterView::new(PeerId::random(), Duration::from_secs(5));
        let forged = MeshEvent { at_ms: 0, kind: MeshEventKind::Refused, peer_id: "x".into(), detail: "y".into() };
        let load = LoadReport { peer_id: b.to_string(), events: vec![forged.clone(), forged], ..Default::default() };
        other.apply(b, GossipMessage::Load(load), Instant::now()).expect("load");
        assert!(other.snapshot().events.iter().all(|e| e.kind != MeshEventKind::Refused));

        // An event about another node is the reporter's word: it is logged under the reporter.
        let victim = PeerId::random().to_string();
        let forged = MeshEvent { at_ms: 1, kind: MeshEventKind::Left, peer_id: victim.clone(), detail: "gone".into() };
        let load = LoadReport { peer_id: b.to_string(), events: vec![forged], ..Default::default() };
        other.apply(b, GossipMessage::Load(load), Instant::now()).expect("load");
        let events = other.snapshot().events;
        assert!(events.iter().all(|e| e.peer_id != victim), "{events:?}");
        let logged = events.iter().find(|e| e.kind == MeshEventKind::Left).expect("the report is kept");
        assert_eq!(logged.peer_id, b.to_string());
        assert!(logged.detail.contains(&format!("about {}", short(&victim))), "{}", logged.detail);
    }
}
