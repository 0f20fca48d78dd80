//! The console's state: a plain struct fed by cluster snapshots (from the mesh or a node's
//! `/v1/cluster`) and by the operator's clicks, with no window and no network in it. The views
//! read it and queue control orders in it; the app sends them. Everything here is bounded: the
//! history, the traces and the event log keep their newest entries.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};

use tandem_mesh::{ChainSnapshot, ClusterSnapshot, ControlCommand, ControlReply, MeshEvent, RequestTrace, Role, short};

/// Seconds of history the charts keep.
pub const HISTORY_S: f64 = 600.0;
/// Request traces kept for the timeline and the latency percentiles.
pub const TRACES: usize = 512;
/// Mesh events kept.
pub const EVENTS: usize = 1000;
/// Finished requests within this window make a sample's percentiles and SLO attainment.
const WINDOW_MS: u64 = 30_000;

/// One node as the table and graph show it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct NodeRow {
    pub peer_id: String,
    pub short: String,
    pub is_self: bool,
    pub role: Option<Role>,
    pub auto_role: bool,
    pub draining: bool,
    pub adapter: String,
    pub backend: String,
    pub device_type: String,
    pub memory_bytes: Option<u64>,
    pub gflops: f64,
    pub gbps: f64,
    pub models: Vec<String>,
    pub running: u64,
    pub waiting: u64,
    pub kv_blocks_used: u64,
    pub kv_blocks_total: u64,
    pub tokens_per_s: f64,
    pub ttft_p50_ms: Option<f64>,
    pub tpot_p50_ms: Option<f64>,
    pub http: Option<String>,
    pub split_requests: u64,
}

impl NodeRow {
    /// Share of the K/V cache in use (0..1).
    pub fn kv_used(&self) -> f32 {
        if self.kv_blocks_total == 0 { 0.0 } else { self.kv_blocks_used as f32 / self.kv_blocks_total as f32 }
    }

    fn matches(&self, filter: &str) -> bool {
        let f = filter.trim().to_lowercase();
        f.is_empty()
            || [&self.peer_id, &self.adapter, &self.backend, &role_name(self.role).to_string()]
                .iter()
                .any(|s| s.to_lowercase().contains(&f))
            || self.models.iter().any(|m| m.to_lowercase().contains(&f))
    }
}

/// A role's name, or "?" before the node's ad arrived.
pub fn role_name(role: Option<Role>) -> &'static str {
    match role {
        Some(Role::Prefill) => "prefill",
        Some(Role::Decode) => "decode",
        Some(Role::Both) => "both",
        Some(Role::Observer) => "observer",
        Some(Role::Auto) => "auto",
        None => "?",
    }
}

/// What a flow between two nodes carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FlowKind {
    /// K/V, from a prefill node to a decode node.
    Kv,
    /// The residual stream between stages of a chain (either way).
    Hidden,
}

/// Bytes streaming from one node to another, now.
#[derive(Clone, Debug, PartialEq)]
pub struct KvFlow {
    pub from: String,
    pub to: String,
    pub kind: FlowKind,
    /// Bytes per second over the last report interval.
    pub bytes_per_s: f64,
}

/// A request trace with the node that served it.
#[derive(Clone, Debug, PartialEq)]
pub struct Trace {
    pub node: String,
    pub trace: RequestTrace,
}

impl Trace {
    /// Arrival to first token.
    pub fn ttft_ms(&self) -> f64 {
        self.trace.decode[0]
    }

    /// Mean time between tokens after the first.
    pub fn tpot_ms(&self) -> Option<f64> {
        let [a, b] = self.trace.decode;
        (self.trace.output_tokens > 1).then(|| (b - a) / (self.trace.output_tokens - 1) as f64)
    }

    fn end_ms(&self) -> u64 {
        self.trace.arrived_ms + self.trace.decode[1] as u64
    }
}

/// One second of the cluster, for the charts.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Sample {
    /// Seconds since the console started.
    pub t: f64,
    pub tokens_per_s: f64,
    pub ttft_p50_ms: Option<f64>,
    pub ttft_p99_ms: Option<f64>,
    pub tpot_p50_ms: Option<f64>,
    pub tpot_p99_ms: Option<f64>,
    /// Share of the window's requests that met both SLOs (0..1).
    pub slo_attainment: Option<f64>,
    pub waiting: u64,
    pub running: u64,
}

/// Latency objectives the charts measure attainment against.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Slo {
    pub ttft_ms: f64,
    pub tpot_ms: f64,
}

impl Default for Slo {
    fn default() -> Self {
        Slo { ttft_ms: 2000.0, tpot_ms: 100.0 }
    }
}

/// Table columns one can sort by.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum SortKey {
    #[default]
    Node,
    Role,
    Adapter,
    Gflops,
    Gbps,
    Running,
    Waiting,
    Kv,
    TokensPerS,
}

/// The bottom panel's tabs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Tab {
    #[default]
    Nodes,
    Requests,
    Events,
}

/// A command for a node, queued by the views.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ControlOrder {
    pub target: String,
    pub command: ControlCommand,
}

/// How the console is fed, and whether it may command nodes.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SourceInfo {
    /// "mesh (12 peers)" or the URL polled.
    pub label: String,
    /// The console holds the mesh secret and talks to the mesh: control messages can be signed.
    pub can_control: bool,
    /// Why it cannot, for the disabled buttons' hover text.
    pub why_not: String,
}

/// Everything the console shows.
#[derive(Debug, Default)]
pub struct ClusterState {
    pub self_id: String,
    pub nodes: BTreeMap<String, NodeRow>,
    pub links: Vec<(String, String)>,
    pub flows: Vec<KvFlow>,
    /// The best chains of span-holding nodes, per model, as the source node ranks them.
    pub chains: Vec<ChainSnapshot>,
    pub history: VecDeque<Sample>,
    pub traces: VecDeque<Trace>,
    pub events: VecDeque<MeshEvent>,
    pub slo: Slo,
    pub source: SourceInfo,
    // What the operator set.
    pub tab: Tab,
    pub sort: SortKey,
    pub descending: bool,
    pub filter: String,
    pub selected: Option<String>,
    /// An action waiting for the operator's confirmation.
    pub pending: Option<ControlOrder>,
    /// Confirmed orders not yet taken by the sender.
    pub outbox: Vec<ControlOrder>,
    /// Answers to sent orders, newest last.
    pub replies: VecDeque<String>,
    /// When the last snapshot arrived (seconds since start).
    pub updated: Option<f64>,
    /// A node to select once it appears (a peer id or its end).
    pub pending_select: Option<String>,
    seen_traces: HashSet<(String, u64)>,
    seen_events: HashSet<(u64, String, String)>,
    /// K/V bytes each decode node has received from each source, when they last grew, and the
    /// rate of that growth.
    received: HashMap<(String, String, FlowKind), LinkReading>,
}

#[derive(Clone, Copy, Debug, PartialEq)]
struct LinkReading {
    bytes: u64,
    at: f64,
    rate: f64,
}

impl ClusterState {
    pub fn new(source: SourceInfo) -> Self {
        ClusterState { source, ..Default::default() }
    }

    /// Takes a snapshot of the cluster seen at `now` (seconds since start).
    pub fn apply(&mut self, snap: &ClusterSnapshot, now: f64) {
        self.self_id = snap.self_id.clone();
        self.nodes = snap
            .nodes
            .iter()
            .map(|n| {
                let load = n.load.clone().unwrap_or_default();
                let adapter = n.adapter.clone().unwrap_or_default();
                let row = NodeRow {
                    peer_id: n.peer_id.clone(),
                    short: short(&n.peer_id).to_string(),
                    is_self: n.is_self,
                    role: n.role,
                    auto_role: n.auto_role,
                    draining: load.draining,
                    adapter: adapter.name,
                    backend: adapter.backend,
                    device_type: adapter.device_type,
                    memory_bytes: adapter.memory_bytes,
                    gflops: n.speed.map_or(0.0, |s| s.gflops),
                    gbps: n.speed.map_or(0.0, |s| s.gbps),
                    models: n
                        .models
                        .iter()
                        .map(|m| {
                            let [start, end] = m.layer_span();
                            let span = if m.holds_all() { String::new() } else { format!(" layers {start}–{end}") };
                            let mode = if m.deterministic { " (deterministic)" } else { "" };
                            format!("{}{span}{mode}", m.id)
                        })
                        .collect(),
                    running: load.running,
                    waiting: load.waiting,
                    kv_blocks_used: load.kv_blocks_total.saturating_sub(load.kv_blocks_free),
                    kv_blocks_total: load.kv_blocks_total,
                    tokens_per_s: load.tokens_per_s,
                    ttft_p50_ms: load.ttft_p50_ms,
                    tpot_p50_ms: load.tpot_p50_ms,
                    http: n.http.clone(),
                    split_requests: load.split_requests,
                };
                (n.peer_id.clone(), row)
            })
            .collect();
        self.links = snap.links.iter().map(|l| (l.a.clone(), l.b.clone())).collect();
        self.chains = snap.chains.clone();
        self.take_flows(snap, now);
        for n in &snap.nodes {
            for t in n.load.iter().flat_map(|l| &l.recent) {
                if self.seen_traces.insert((n.peer_id.clone(), t.id)) {
                    self.traces.push_back(Trace { node: n.peer_id.clone(), trace: t.clone() });
                }
            }
        }
        while self.traces.len() > TRACES {
            if let Some(old) = self.traces.pop_front() {
                self.seen_traces.remove(&(old.node, old.trace.id));
            }
        }
        for e in &snap.events {
            let key = (e.at_ms, e.peer_id.clone(), e.detail.clone());
            if self.seen_events.insert(key) {
                self.events.push_back(e.clone());
            }
        }
        while self.events.len() > EVENTS {
            if let Some(old) = self.events.pop_front() {
                self.seen_events.remove(&(old.at_ms, old.peer_id, old.detail));
            }
        }
        if let Some(want) = &self.pending_select
            && let Some(n) = self.nodes.keys().find(|p| p.ends_with(want.as_str()))
        {
            self.selected = Some(n.clone());
            self.pending_select = None;
        }
        if let Some(s) = &self.selected
            && !self.nodes.contains_key(s)
        {
            self.selected = None;
        }
        self.sample(now);
        self.updated = Some(now);
    }

    /// Live rates: each node reports the K/V and hidden-state bytes it has received from each
    /// other node; their growth since the last change is the flow now (reports come once a
    /// second, snapshots more often).
    fn take_flows(&mut self, snap: &ClusterSnapshot, now: f64) {
        let mut readings = HashMap::new();
        for n in &snap.nodes {
            let Some(load) = &n.load else { continue };
            let kv = load.kv_links.iter().map(|l| (&l.from, l.bytes, FlowKind::Kv));
            let hidden = load.hidden_links.iter().map(|l| (&l.from, l.bytes, FlowKind::Hidden));
            for (from, bytes, kind) in kv.chain(hidden) {
                let key = (from.clone(), n.peer_id.clone(), kind);
                let mut r = self.received.get(&key).copied().unwrap_or(LinkReading { bytes, at: now, rate: 0.0 });
                if bytes > r.bytes {
                    r.rate = (bytes - r.bytes) as f64 / (now - r.at).max(0.5);
                    (r.bytes, r.at) = (bytes, now);
                } else if bytes < r.bytes {
                    // The node restarted: start over.
                    r = LinkReading { bytes, at: now, rate: 0.0 };
                } else if now - r.at > 2.5 {
                    r.rate = 0.0;
                }
                readings.insert(key, r);
            }
        }
        self.flows = readings
            .iter()
            .filter(|(_, r)| r.rate > 0.0)
            .map(|((from, to, kind), r)| KvFlow { from: from.clone(), to: to.clone(), kind: *kind, bytes_per_s: r.rate })
            .collect();
        self.flows.sort_by(|a, b| (&a.from, &a.to, a.kind).cmp(&(&b.from, &b.to, b.kind)));
        self.received = readings;
    }

    fn sample(&mut self, now: f64) {
        if self.history.back().is_some_and(|s| now - s.t < 0.9) {
            return;
        }
        let newest = self.traces.iter().map(Trace::end_ms).max().unwrap_or(0);
        let recent: Vec<&Trace> = self.traces.iter().filter(|t| t.end_ms() + WINDOW_MS >= newest).collect();
        let ttft: Vec<f64> = recent.iter().filter(|t| t.trace.output_tokens > 0).map(|t| t.ttft_ms()).collect();
        let tpot: Vec<f64> = recent.iter().filter_map(|t| t.tpot_ms()).collect();
        let met = recent
            .iter()
            .filter(|t| t.trace.output_tokens > 0 && t.ttft_ms() <= self.slo.ttft_ms && t.tpot_ms().is_none_or(|p| p <= self.slo.tpot_ms))
            .count();
        let serving = || self.nodes.values().filter(|n| n.role != Some(Role::Observer));
        self.history.push_back(Sample {
            t: now,
            tokens_per_s: serving().map(|n| n.tokens_per_s).fold(0.0, |a, b| a + b),
            ttft_p50_ms: percentile(&ttft, 0.5),
            ttft_p99_ms: percentile(&ttft, 0.99),
            tpot_p50_ms: percentile(&tpot, 0.5),
            tpot_p99_ms: percentile(&tpot, 0.99),
            slo_attainment: (!ttft.is_empty()).then(|| met as f64 / ttft.len() as f64),
            waiting: serving().map(|n| n.waiting).sum(),
            running: serving().map(|n| n.running).sum(),
        });
        while self.history.front().is_some_and(|s| now - s.t > HISTORY_S) {
            self.history.pop_front();
        }
    }

    /// The nodes the table shows: filtered, then sorted.
    pub fn table_rows(&self) -> Vec<&NodeRow> {
        let mut rows: Vec<&NodeRow> = self.nodes.values().filter(|n| n.matches(&self.filter)).collect();
        let f = |x: f64| (x * 1e3) as i64;
        rows.sort_by(|a, b| {
            let o = match self.sort {
                SortKey::Node => a.short.cmp(&b.short),
                SortKey::Role => role_name(a.role).cmp(role_name(b.role)),
                SortKey::Adapter => a.adapter.cmp(&b.adapter),
                SortKey::Gflops => f(a.gflops).cmp(&f(b.gflops)),
                SortKey::Gbps => f(a.gbps).cmp(&f(b.gbps)),
                SortKey::Running => a.running.cmp(&b.running),
                SortKey::Waiting => a.waiting.cmp(&b.waiting),
                SortKey::Kv => f(a.kv_used() as f64).cmp(&f(b.kv_used() as f64)),
                SortKey::TokensPerS => f(a.tokens_per_s).cmp(&f(b.tokens_per_s)),
            };
            let o = o.then_with(|| a.peer_id.cmp(&b.peer_id));
            if self.descending { o.reverse() } else { o }
        });
        rows
    }

    /// A column header was clicked: sort by it, or flip the order if it sorts already.
    pub fn sort_by(&mut self, key: SortKey) {
        if self.sort == key {
            self.descending = !self.descending;
        } else {
            self.sort = key;
            // Numbers read best largest first.
            self.descending = !matches!(key, SortKey::Node | SortKey::Role | SortKey::Adapter);
        }
    }

    /// Asks for confirmation of `command` on `target` (nothing is sent yet).
    pub fn propose(&mut self, target: &str, command: ControlCommand) {
        if self.source.can_control {
            self.pending = Some(ControlOrder { target: target.into(), command });
        }
    }

    /// The operator confirmed the pending action: queue it for sending.
    pub fn confirm(&mut self) {
        if let Some(order) = self.pending.take() {
            self.outbox.push(order);
        }
    }

    pub fn cancel(&mut self) {
        self.pending = None;
    }

    /// A line for the operator under the summary (an answer, or the source's state); the last
    /// few are kept.
    pub fn tell(&mut self, line: String) {
        self.replies.push_back(line);
        while self.replies.len() > 8 {
            self.replies.pop_front();
        }
    }

    /// A node answered an order (or it could not be delivered).
    pub fn reply(&mut self, order: &ControlOrder, result: &Result<ControlReply, String>) {
        let who = short(&order.target);
        let line = match result {
            Ok(ControlReply::Done { role, draining }) => {
                format!("{who}: {} done (role {role}{})", order.command, if *draining { ", draining" } else { "" })
            }
            Ok(ControlReply::Refused { message }) => format!("{who}: {} refused: {message}", order.command),
            Err(e) => format!("{who}: {} not delivered: {e}", order.command),
        };
        self.tell(line);
    }

    /// Nodes per role, in the order the summary lists them.
    pub fn role_counts(&self) -> Vec<(Option<Role>, usize)> {
        let roles = [Some(Role::Prefill), Some(Role::Decode), Some(Role::Both), Some(Role::Observer), None];
        roles.iter().map(|r| (*r, self.nodes.values().filter(|n| n.role == *r).count())).filter(|(_, c)| *c > 0).collect()
    }
}

/// The `q` quantile of `v` by nearest rank; None when empty.
pub fn percentile(v: &[f64], q: f64) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let i = ((q * s.len() as f64).ceil() as usize).clamp(1, s.len()) - 1;
    Some(s[i])
}
