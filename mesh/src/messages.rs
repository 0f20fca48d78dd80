//! What nodes tell each other on gossipsub: a capability ad (what a node is and can do; sent on
//! change, when a peer subscribes, and every few seconds) and a load report (about once a
//! second). Small, versioned JSON with a hard size bound; every field is checked for plausibility
//! before it reaches the cluster view, since gossip is relayed by peers we do not control.

use serde::{Deserialize, Serialize};

use crate::cluster::MeshEvent;
use crate::roles::Role;

/// Version of the gossip and stream messages; a peer with another version is ignored.
pub const PROTOCOL_VERSION: u16 = 1;

/// Largest gossip message accepted or sent.
pub const MAX_GOSSIP_BYTES: usize = 64 * 1024;

const MAX_TEXT: usize = 256;
const MAX_MODELS: usize = 16;
const MAX_ADDRESSES: usize = 32;
const MAX_PEERS_LISTED: usize = 512;

/// Measured speed of a node's GPU, from its start-up micro-benchmark of our own kernels.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Default)]
pub struct Speed {
    /// Matmul throughput.
    pub gflops: f64,
    /// Matvec weight-streaming bandwidth.
    pub gbps: f64,
}

/// The GPU a node runs on.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct AdapterAd {
    pub name: String,
    pub vendor: String,
    /// Vulkan, Metal, Dx12, Gl or BrowserWebGpu.
    pub backend: String,
    /// DiscreteGpu, IntegratedGpu, Cpu, ...
    pub device_type: String,
    /// Device memory in bytes, where the platform tells it.
    pub memory_bytes: Option<u64>,
}

/// A model a node serves.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct ModelAd {
    /// The API id clients ask for.
    pub id: String,
    /// Hash of the architecture, shapes, weights and tokenizer: nodes with equal fingerprints
    /// compute the same tokens.
    pub fingerprint: String,
    pub parameters: u64,
    pub weight_bytes: u64,
    pub context: u64,
    /// Bytes of K/V one token sends between nodes (all layers, K and V, in the cache's dtype).
    pub kv_bytes_per_token: u64,
    /// Transformer layers (K/V streams one layer at a time).
    #[serde(default)]
    pub layers: u32,
    /// Whether the node runs batch-invariant kernels only, so its tokens at temperature 0 do not
    /// depend on batching (`--deterministic`).
    #[serde(default)]
    pub deterministic: bool,
    /// How the node's K/V cache stores values, "f16" or "f32" (nodes from before it was a choice
    /// send nothing and cache f32). K/V moves only between nodes of one dtype (placement).
    #[serde(default = "f32_dtype")]
    pub kv_dtype: String,
    /// The layers `[start, end)` the node holds when it holds only part of the model, as one
    /// stage of a chain (`None`: all of them; nodes from before spans send nothing).
    #[serde(default)]
    pub span: Option<[u32; 2]>,
}

fn f32_dtype() -> String {
    "f32".into()
}

impl ModelAd {
    /// The layers the node holds.
    pub fn layer_span(&self) -> [u32; 2] {
        self.span.unwrap_or([0, self.layers])
    }

    /// Whether the node holds every layer, so it serves a request by itself.
    pub fn holds_all(&self) -> bool {
        self.layer_span() == [0, self.layers]
    }
}

/// What a node is and can do.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct CapabilityAd {
    pub peer_id: String,
    /// Software version.
    pub version: String,
    /// The role the node has now.
    pub role: Role,
    /// Whether the role was chosen by `auto` (and may flip) rather than pinned.
    pub auto_role: bool,
    pub adapter: Option<AdapterAd>,
    pub speed: Speed,
    pub models: Vec<ModelAd>,
    /// Where its HTTP API listens, for scripts and the console.
    pub http: Option<String>,
    pub addresses: Vec<String>,
}

/// How busy a node is.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct LoadReport {
    pub peer_id: String,
    pub running: u64,
    pub waiting: u64,
    pub queued_prefill_tokens: u64,
    pub kv_blocks_free: u64,
    pub kv_blocks_total: u64,
    /// Generated tokens per second over the last few seconds.
    pub tokens_per_s: f64,
    pub ttft_p50_ms: Option<f64>,
    pub ttft_p99_ms: Option<f64>,
    pub tpot_p50_ms: Option<f64>,
    pub tpot_p99_ms: Option<f64>,
    /// Not taking new work (role flip or shutdown under way).
    pub draining: bool,
    /// Peers it has a direct connection to: the cluster's links.
    pub peers: Vec<String>,
    /// K/V bytes sent to and received from other nodes, in all.
    #[serde(default)]
    pub kv_sent_bytes: u64,
    #[serde(default)]
    pub kv_received_bytes: u64,
    /// Measured K/V transfer rates from other nodes to this one (bytes/s, recent average).
    #[serde(default)]
    pub kv_links: Vec<KvLinkRate>,
    /// Hidden-state bytes received from each node it chains with (layer spans), in all: the
    /// console draws the residual stream's traffic between stages from its growth.
    #[serde(default)]
    pub hidden_links: Vec<HiddenLinkBytes>,
    /// Share of the last K/V transfers' time hidden behind the prefill's compute (0..1).
    #[serde(default)]
    pub kv_overlap: Option<f64>,
    /// Requests split across nodes (prefill elsewhere, decode here) and moved here live.
    #[serde(default)]
    pub split_requests: u64,
    #[serde(default)]
    pub migrated_in: u64,
    /// Requests this node finished since its last report, for the console's timeline.
    #[serde(default)]
    pub recent: Vec<RequestTrace>,
    /// Failures and re-placements this node saw since its last report (the mesh's own joins and
    /// leaves every node sees by itself).
    #[serde(default)]
    pub events: Vec<MeshEvent>,
}

/// Traces one load report carries at most.
pub const MAX_TRACES: usize = 32;
/// Events one load report carries at most.
pub const MAX_REPORTED_EVENTS: usize = 32;

/// Where a request served by a node spent its time, in ms from its arrival there.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct RequestTrace {
    /// Unique per node, in order of arrival.
    pub id: u64,
    /// Unix time in milliseconds when it arrived at this node.
    pub arrived_ms: u64,
    pub model: String,
    pub prompt_tokens: u64,
    pub output_tokens: u64,
    /// Waiting for the scheduler (or for a prefill node).
    pub queue_ms: f64,
    /// The prefill node, when another node computed the prompt's K/V.
    #[serde(default)]
    pub prefill_peer: Option<String>,
    /// The prompt's compute, here or on the prefill node: [start, end].
    pub prefill: [f64; 2],
    /// The first and last K/V layer arriving from the prefill node.
    #[serde(default)]
    pub kv: Option<[f64; 2]>,
    /// The first token to the last.
    pub decode: [f64; 2],
    /// done, stop, length, cancelled, moved or failed.
    pub outcome: String,
}

impl RequestTrace {
    fn check(&self) -> Result<(), String> {
        let spans = [Some(self.prefill), self.kv, Some(self.decode)];
        let ok = self.queue_ms.is_finite()
            && (0.0..=1e9).contains(&self.queue_ms)
            && spans.iter().flatten().all(|[a, b]| a.is_finite() && b.is_finite() && 0.0 <= *a && a <= b && *b <= 1e9);
        if !ok {
            return Err(format!("request trace {} has implausible times", self.id));
        }
        Ok(())
    }
}

/// A measured K/V rate from one node to the reporting one.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct KvLinkRate {
    pub from: String,
    pub bytes_per_s: f64,
    /// K/V bytes received from that node, in all (the console draws live flows from its growth).
    #[serde(default)]
    pub bytes: u64,
}

/// Hidden-state bytes a node has received from another, in all.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct HiddenLinkBytes {
    pub from: String,
    pub bytes: u64,
}

/// One gossip message.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum GossipMessage {
    Capability(CapabilityAd),
    Load(LoadReport),
    /// The node is leaving on purpose; forget it now rather than at the timeout.
    Leaving {
        peer_id: String,
        reason: String,
    },
}

#[derive(Serialize, Deserialize)]
struct Envelope<M> {
    v: u16,
    #[serde(flatten)]
    message: M,
}

impl GossipMessage {
    /// The peer the message speaks for.
    pub fn peer_id(&self) -> &str {
        match self {
            GossipMessage::Capability(a) => &a.peer_id,
            GossipMessage::Load(l) => &l.peer_id,
            GossipMessage::Leaving { peer_id, .. } => peer_id,
        }
    }

    /// The wire form; fails only if it would exceed [`MAX_GOSSIP_BYTES`].
    pub fn encode(&self) -> Result<Vec<u8>, String> {
        let bytes = serde_json::to_vec(&Envelope { v: PROTOCOL_VERSION, message: self }).map_err(|e| e.to_string())?;
        if bytes.len() > MAX_GOSSIP_BYTES {
            return Err(format!("message of {} bytes exceeds the {MAX_GOSSIP_BYTES}-byte bound", bytes.len()));
        }
        Ok(bytes)
    }

    /// Parses and checks a message; the error says what was wrong.
    pub fn decode(bytes: &[u8]) -> Result<Self, String> {
        if bytes.len() > MAX_GOSSIP_BYTES {
            return Err(format!("{} bytes exceeds the {MAX_GOSSIP_BYTES}-byte bound", bytes.len()));
        }
        #[derive(Deserialize)]
        struct Version {
            v: u16,
        }
        let Version { v } = serde_json::from_slice(bytes).map_err(|e| format!("not a tandem message: {e}"))?;
        if v != PROTOCOL_VERSION {
            return Err(format!("protocol version {v}, this node speaks {PROTOCOL_VERSION}"));
        }
        let Envelope { message, .. }: Envelope<GossipMessage> = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        message.check()?;
        Ok(message)
    }

    fn check(&self) -> Result<(), String> {
        fn text(name: &str, s: &str) -> Result<(), String> {
            if s.len() > MAX_TEXT { Err(format!("{name} is {} bytes long (at most {MAX_TEXT})", s.len())) } else { Ok(()) }
        }
        fn number(name: &str, v: f64, max: f64) -> Result<(), String> {
            if v.is_finite() && (0.0..=max).contains(&v) { Ok(()) } else { Err(format!("{name} = {v} is not plausible")) }
        }
        fn list(name: &str, n: usize, max: usize) -> Result<(), String> {
            if n > max { Err(format!("{n} {name} (at most {max})")) } else { Ok(()) }
        }
        text("peer_id", self.peer_id())?;
        match self {
            GossipMessage::Capability(a) => {
                text("version", &a.version)?;
                if a.role == Role::Auto {
                    return Err("a node advertises the role it has, never `auto`".into());
                }
                if let Some(ad) = &a.adapter {
                    for (n, s) in
                        [("adapter", &ad.name), ("vendor", &ad.vendor), ("backend", &ad.backend), ("device_type", &ad.device_type)]
                    {
                        text(n, s)?;
                    }
                }
                number("gflops", a.speed.gflops, 1e7)?;
                number("gbps", a.speed.gbps, 1e5)?;
                list("models", a.models.len(), MAX_MODELS)?;
                for m in &a.models {
                    text("model id", &m.id)?;
                    text("fingerprint", &m.fingerprint)?;
                    text("kv dtype", &m.kv_dtype)?;
                    if m.id.is_empty() || m.fingerprint.is_empty() || m.parameters == 0 {
                        return Err(format!("model `{}` lacks an id, fingerprint or size", m.id));
                    }
                    if let Some([start, end]) = m.span
                        && !(start < end && end <= m.layers)
                    {
                        return Err(format!("model `{}` spans layers {start}..{end} of {}", m.id, m.layers));
                    }
                }
                list("addresses", a.addresses.len(), MAX_ADDRESSES)?;
                for s in a.addresses.iter().chain(a.http.iter()) {
                    text("address", s)?;
                }
            }
            GossipMessage::Load(l) => {
                number("tokens_per_s", l.tokens_per_s, 1e9)?;
                for (n, v) in [
                    ("ttft_p50_ms", l.ttft_p50_ms),
                    ("ttft_p99_ms", l.ttft_p99_ms),
                    ("tpot_p50_ms", l.tpot_p50_ms),
                    ("tpot_p99_ms", l.tpot_p99_ms),
                ] {
                    if let Some(v) = v {
                        number(n, v, 1e9)?;
                    }
                }
                if l.kv_blocks_free > l.kv_blocks_total {
                    return Err(format!("{} free KV blocks of {}", l.kv_blocks_free, l.kv_blocks_total));
                }
                list("peers", l.peers.len(), MAX_PEERS_LISTED)?;
                for p in &l.peers {
                    text("peer", p)?;
                }
                list("kv_links", l.kv_links.len(), MAX_PEERS_LISTED)?;
                for k in &l.kv_links {
                    text("kv link", &k.from)?;
                    number("kv link bytes_per_s", k.bytes_per_s, 1e13)?;
                }
                list("hidden_links", l.hidden_links.len(), MAX_PEERS_LISTED)?;
                for h in &l.hidden_links {
                    text("hidden link", &h.from)?;
                }
                if let Some(o) = l.kv_overlap {
                    number("kv_overlap", o, 1.0)?;
                }
                list("request traces", l.recent.len(), MAX_TRACES)?;
                for t in &l.recent {
                    text("trace model", &t.model)?;
                    text("trace outcome", &t.outcome)?;
                    text("trace prefill peer", t.prefill_peer.as_deref().unwrap_or_default())?;
                    t.check()?;
                }
                list("events", l.events.len(), MAX_REPORTED_EVENTS)?;
                for e in &l.events {
                    text("event peer", &e.peer_id)?;
                    text("event detail", &e.detail)?;
                }
            }
            GossipMessage::Leaving { reason, .. } => text("reason", reason)?,
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ad() -> CapabilityAd {
        CapabilityAd {
            peer_id: "12D3KooWtest".into(),
            version: "0.1.0".into(),
            role: Role::Both,
            auto_role: false,
            adapter: Some(AdapterAd {
                name: "llvmpipe".into(),
                vendor: "0x10005".into(),
                backend: "Vulkan".into(),
                device_type: "Cpu".into(),
                memory_bytes: None,
            }),
            speed: Speed { gflops: 12.5, gbps: 8.0 },
            models: vec![ModelAd {
                id: "smollm2-135m".into(),
                fingerprint: "abcd".into(),
                parameters: 134_515_008,
                weight_bytes: 1,
                context: 8192,
                kv_bytes_per_token: 1,
                layers: 30,
                deterministic: true,
                kv_dtype: "f16".into(),
                span: None,
            }],
            http: Some("127.0.0.1:8080".into()),
            addresses: vec!["/ip4/127.0.0.1/tcp/4001".into()],
        }
    }

    #[test]
    fn messages_round_trip() {
        let load = LoadReport {
            peer_id: "p".into(),
            running: 3,
            kv_blocks_free: 1,
            kv_blocks_total: 2,
            ttft_p50_ms: Some(12.0),
            peers: vec!["q".into()],
            ..Default::default()
        };
        for m in [
            GossipMessage::Capability(ad()),
            GossipMessage::Load(load),
            GossipMessage::Leaving { peer_id: "p".into(), reason: "shutdown".into() },
        ] {
            let bytes = m.encode().expect("encodes");
            assert_eq!(GossipMessage::decode(&bytes).expect("decodes"), m);
        }
    }

    #[test]
    fn a_span_travels_and_ads_from_before_spans_hold_every_layer() {
        let mut partial = ad();
        partial.models[0].span = Some([10, 20]);
        let m = GossipMessage::Capability(partial);
        assert_eq!(GossipMessage::decode(&m.encode().expect("encodes")).expect("decodes"), m);

        let mut old: serde_json::Value = serde_json::from_slice(&GossipMessage::Capability(ad()).encode().expect("encodes")).expect("json");
        old["models"][0].as_object_mut().expect("model").remove("span");
        let GossipMessage::Capability(old) = GossipMessage::decode(&serde_json::to_vec(&old).expect("json")).expect("decodes") else {
            panic!("a capability ad")
        };
        assert_eq!(old.models[0].span, None);
        assert!(old.models[0].holds_all());
        assert_eq!(old.models[0].layer_span(), [0, 30]);
        let whole = ModelAd { span: Some([0, 30]), ..old.models[0].clone() };
        assert!(whole.holds_all(), "a span of every layer is the whole model");
        assert!(!ModelAd { span: Some([0, 29]), ..whole }.holds_all());

        for span in [[10, 10], [20, 10], [0, 31]] {
            let mut bad = ad();
            bad.models[0].span = Some(span);
            let e = GossipMessage::decode(&GossipMessage::Capability(bad).encode().expect("encodes")).expect_err("implausible span");
            assert!(e.contains("spans layers"), "{span:?}: {e}");
        }
    }

    #[test]
    fn malformed_oversized_foreign_and_implausible_messages_are_refused() {
        let good = GossipMessage::Capability(ad()).encode().expect("encodes");
        let mut cases: Vec<(Vec<u8>, &str)> = vec![
            (vec![], "not a tandem message"),
            (b"{\"v\":1".to_vec(), "not a tandem message"),
            (vec![0xff; 100], "not a tandem message"),
            (vec![b' '; MAX_GOSSIP_BYTES + 1], "bound"),
            (String::from_utf8_lossy(&good).replacen("\"v\":1", "\"v\":2", 1).into_bytes(), "version 2"),
            (String::from_utf8_lossy(&good).replacen("\"capability\"", "\"mystery\"", 1).into_bytes(), "unknown variant"),
        ];
        for (field, value) in [("gflops", "-1.0"), ("gbps", "1e300"), ("role", "\"auto\"")] {
            let mut v: serde_json::Value = serde_json::from_slice(&good).expect("json");
            v[field] = serde_json::from_str(value).expect("value");
            if field != "role" {
                v["speed"][field] = serde_json::from_str(value).expect("value");
            }
            cases.push((serde_json::to_vec(&v).expect("json"), "plausible"));
        }
        let mut long = ad();
        long.models[0].id = "x".repeat(300);
        cases.push((serde_json::to_vec(&serde_json::json!({"v": 1, "type": "capability", "peer_id": long.peer_id, "version": "1", "role": "both", "auto_role": false, "adapter": null, "speed": {"gflops": 1.0, "gbps": 1.0}, "models": long.models, "http": null, "addresses": []})).expect("json"), "at most"));
        let mut many = ad();
        many.models = vec![many.models[0].clone(); 17];
        cases.push((GossipMessage::Capability(many).encode().expect("encodes"), "at most 16"));
        let lying = LoadReport { peer_id: "p".into(), kv_blocks_free: 5, kv_blocks_total: 2, ..Default::default() };
        cases.push((GossipMessage::Load(lying).encode().expect("encodes"), "free KV blocks"));
        for (bytes, why) in cases {
            let e = GossipMessage::decode(&bytes).expect_err(why);
            assert!(e.contains(why) || why == "plausible" && (e.contains("plausible") || e.contains("auto")), "{why}: {e}");
        }
    }
}
