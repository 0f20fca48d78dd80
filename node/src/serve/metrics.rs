//! `GET /metrics`: Prometheus text exposition of request latencies (histograms observed as
//! requests finish) and the scheduler's gauges and counters (read at scrape time).

use std::sync::{Arc, Mutex};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tandem_core::scheduler::{RequestTimings, SchedulerStats};

/// Latency histograms and the source of the scheduler's numbers.
pub struct Metrics {
    registry: Registry,
    ttft: Histogram,
    tpot: Histogram,
    e2e: Histogram,
    queue: Histogram,
    stats: Arc<Mutex<Option<tandem_core::worker::WorkerHandle>>>,
    forwarded: prometheus_client::metrics::counter::Counter,
    served_for_peers: prometheus_client::metrics::counter::Counter,
    pub kv: KvMetrics,
    pub chain: ChainMetrics,
    pub weights: WeightsMetrics,
    /// (TTFT, TPOT) in ms of the last requests, for the load report's percentiles.
    recent: Mutex<std::collections::VecDeque<(Option<f64>, Option<f64>)>>,
    /// Requests finished since the last load report, for the console's timeline.
    traces: Mutex<std::collections::VecDeque<tandem_mesh::RequestTrace>>,
    next_trace: std::sync::atomic::AtomicU64,
}

/// Finished requests the load report's percentiles are taken over.
const RECENT: usize = 256;

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

#[derive(Debug)]
struct SchedulerCollector(Arc<Mutex<Option<tandem_core::worker::WorkerHandle>>>);

fn gauge(enc: &mut DescriptorEncoder, name: &str, help: &str, v: f64) -> Result<(), std::fmt::Error> {
    let g = ConstGauge::new(v);
    g.encode(enc.encode_descriptor(name, help, None, g.metric_type())?)
}

fn counter(enc: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> Result<(), std::fmt::Error> {
    let c = ConstCounter::new(v);
    c.encode(enc.encode_descriptor(name, help, None, c.metric_type())?)
}

impl Collector for SchedulerCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(s) = self.0.lock().ok().and_then(|w| w.as_ref().map(|w| w.stats())) else { return Ok(()) };
        let SchedulerStats { running, waiting, queued_prefill_tokens, kv_blocks_used, kv_blocks_cached, kv_blocks_total, .. } = s;
        gauge(&mut enc, "tandem_requests_running", "Requests admitted to the engine", running as f64)?;
        gauge(&mut enc, "tandem_requests_waiting", "Requests waiting for admission", waiting as f64)?;
        gauge(&mut enc, "tandem_prefill_tokens_queued", "Prompt tokens not yet prefilled", queued_prefill_tokens as f64)?;
        gauge(&mut enc, "tandem_kv_blocks_used", "KV cache blocks held by requests", kv_blocks_used as f64)?;
        gauge(&mut enc, "tandem_kv_blocks_cached", "Unused KV blocks kept for the prefix cache", kv_blocks_cached as f64)?;
        gauge(&mut enc, "tandem_kv_blocks_total", "KV cache blocks in all", kv_blocks_total as f64)?;
        let rate = if s.prompt_tokens == 0 { 0.0 } else { s.prefix_cache_hit_tokens as f64 / s.prompt_tokens as f64 };
        gauge(&mut enc, "tandem_prefix_cache_hit_rate", "Share of prompt tokens found in the prefix cache", rate)?;
        counter(&mut enc, "tandem_prompt_tokens", "Prompt tokens received", s.prompt_tokens)?;
        counter(&mut enc, "tandem_prefix_cache_hit_tokens", "Prompt tokens taken from the prefix cache", s.prefix_cache_hit_tokens)?;
        counter(&mut enc, "tandem_generated_tokens", "Tokens generated", s.generated_tokens)?;
        counter(&mut enc, "tandem_preemptions", "Requests preempted for lack of KV blocks", s.preemptions)?;
        counter(&mut enc, "tandem_engine_steps", "Engine steps run", s.steps)?;
        counter(&mut enc, "tandem_requests_finished", "Requests that ended, for any reason", s.finished)?;
        counter(&mut enc, "tandem_prefill_computed_tokens", "Positions computed here in prefill chunks", s.prefill_computed_tokens)?;
        counter(
            &mut enc,
            "tandem_kv_imported_tokens",
            "Positions whose K/V was imported from another node, not computed",
            s.imported_tokens,
        )?;
        counter(
            &mut enc,
            "tandem_kv_exported_tokens",
            "Positions whose K/V was computed here and sent to another node",
            s.exported_tokens,
        )?;
        counter(&mut enc, "tandem_requests_detached", "Requests handed to another node while draining", s.detached)?;
        gauge(&mut enc, "tandem_kv_parked_sequences", "Imported K/V waiting for its request", s.parked as f64)?;
        counter(&mut enc, "tandem_stage_engine_steps", "Engine steps run for chains' stage sessions", s.stage_steps)?;
        counter(
            &mut enc,
            "tandem_stage_session_steps",
            "Session-steps those engine steps held (batching across requests)",
            s.stage_session_steps,
        )?;
        counter(&mut enc, "tandem_stage_tokens", "Tokens those engine steps held", s.stage_tokens)?;
        counter(&mut enc, "tandem_stage_busy_microseconds", "GPU worker time spent on stage steps", s.stage_busy_us)?;
        Ok(())
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        // 1 ms to about 65 s.
        let latency = || Histogram::new(exponential_buckets(0.001, 2.0, 17));
        let (ttft, tpot, e2e, queue) = (latency(), latency(), latency(), latency());
        registry.register("tandem_time_to_first_token_seconds", "Arrival to first token", ttft.clone());
        registry.register("tandem_time_per_output_token_seconds", "Mean time between output tokens of a request", tpot.clone());
        registry.register("tandem_e2e_request_latency_seconds", "Arrival to the last token", e2e.clone());
        registry.register("tandem_queue_time_seconds", "Arrival to admission", queue.clone());
        let stats: Arc<Mutex<Option<tandem_core::worker::WorkerHandle>>> = Arc::default();
        registry.register_collector(Box::new(SchedulerCollector(stats.clone())));
        let forwarded = prometheus_client::metrics::counter::Counter::default();
        let served_for_peers = prometheus_client::metrics::counter::Counter::default();
        registry.register("tandem_mesh_forwarded_requests", "Requests this node placed on another node", forwarded.clone());
        registry.register("tandem_mesh_served_requests", "Requests this node ran for another node", served_for_peers.clone());
        let kv = KvMetrics::register(&mut registry);
        let chain = ChainMetrics::register(&mut registry);
        let weights = WeightsMetrics::register(&mut registry);
        Metrics {
            registry,
            ttft,
            tpot,
            e2e,
            queue,
            stats,
            forwarded,
            served_for_peers,
            kv,
            chain,
            weights,
            recent: Mutex::default(),
            traces: Mutex::default(),
            next_trace: Default::default(),
        }
    }

    /// Reads the scheduler's numbers from `worker` from now on.
    pub fn attach(&self, worker: tandem_core::worker::WorkerHandle) {
        if let Ok(mut w) = self.stats.lock() {
            *w = Some(worker);
        }
    }

    /// Records a finished request.
    pub fn observe(&self, t: &RequestTimings) {
        if let Some(ttft) = t.ttft {
            self.ttft.observe(ttft.as_secs_f64());
        }
        if let Some(tpot) = t.tpot {
            self.tpot.observe(tpot.as_secs_f64());
        }
        self.e2e.observe(t.e2e.as_secs_f64());
        self.queue.observe(t.queued.as_secs_f64());
        if let Ok(mut r) = self.recent.lock() {
            if r.len() == RECENT {
                r.pop_front();
            }
            r.push_back((t.ttft.map(|d| d.as_secs_f64() * 1e3), t.tpot.map(|d| d.as_secs_f64() * 1e3)));
        }
    }

    /// Keeps a finished request's trace for the next load report (the newest ones, if more
    /// finish than a report carries).
    pub fn trace(&self, mut t: tandem_mesh::RequestTrace) {
        t.id = self.next_trace.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if let Ok(mut q) = self.traces.lock() {
            if q.len() == tandem_mesh::MAX_TRACES {
                q.pop_front();
            }
            q.push_back(t);
        }
    }

    /// The traces kept since the last call.
    pub fn take_traces(&self) -> Vec<tandem_mesh::RequestTrace> {
        self.traces.lock().map(|mut q| q.drain(..).collect()).unwrap_or_default()
    }

    pub fn forwarded(&self) {
        self.forwarded.inc();
    }

    pub fn served_for_peer(&self) {
        self.served_for_peers.inc();
    }

    /// TTFT p50, p99 and TPOT p50, p99 in ms over the last requests.
    pub fn recent_percentiles(&self) -> (Option<f64>, Option<f64>, Option<f64>, Option<f64>) {
        let Ok(r) = self.recent.lock() else { return (None, None, None, None) };
        let ttft: Vec<f64> = r.iter().filter_map(|x| x.0).collect();
        let tpot: Vec<f64> = r.iter().filter_map(|x| x.1).collect();
        let pick = |v: Vec<f64>| (!v.is_empty()).then(|| crate::loadgen::percentiles(v));
        let (ttft, tpot) = (pick(ttft), pick(tpot));
        (ttft.as_ref().map(|p| p.p50), ttft.map(|p| p.p99), tpot.as_ref().map(|p| p.p50), tpot.map(|p| p.p99))
    }

    /// The text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::error!(error = %e, "encoding metrics");
        }
        out
    }
}

type Counter = prometheus_client::metrics::counter::Counter;
type Gauge = prometheus_client::metrics::gauge::Gauge<f64, std::sync::atomic::AtomicU64>;

/// The disaggregated path's numbers: K/V moved, how long it took, how much compute hid it,
/// requests split, resumed and migrated, and the length predictor's error.
pub struct KvMetrics {
    pub sent_bytes: Counter,
    pub received_bytes: Counter,
    /// Seconds from the first K/V chunk's arrival to the last one's (decode side).
    pub transfer: Histogram,
    /// Seconds of a split request's prefill on the prefill node.
    pub prefill: Histogram,
    /// Share of the transfer hidden behind the prefill's compute.
    pub overlap: Histogram,
    pub split_requests: Counter,
    pub split_fallbacks: Counter,
    pub prefills_served: Counter,
    pub resumed_requests: Counter,
    pub migrated_out: Counter,
    pub migrated_in: Counter,
    pub rejected_transfers: Counter,
    pub length_error: Gauge,
    /// The overlap of the last transfers (mean of the last few), for the load report.
    pub recent_overlap: Mutex<Option<f64>>,
}

impl KvMetrics {
    fn register(r: &mut Registry) -> Self {
        let m = KvMetrics {
            transfer: Histogram::new(exponential_buckets(0.0005, 2.0, 18)),
            prefill: Histogram::new(exponential_buckets(0.001, 2.0, 17)),
            overlap: Histogram::new([0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 1.0]),
            sent_bytes: Counter::default(),
            received_bytes: Counter::default(),
            split_requests: Counter::default(),
            split_fallbacks: Counter::default(),
            prefills_served: Counter::default(),
            resumed_requests: Counter::default(),
            migrated_out: Counter::default(),
            migrated_in: Counter::default(),
            rejected_transfers: Counter::default(),
            length_error: Gauge::default(),
            recent_overlap: Mutex::default(),
        };
        r.register("tandem_kv_sent_bytes", "K/V bytes sent to other nodes", m.sent_bytes.clone());
        r.register("tandem_kv_received_bytes", "K/V bytes received from other nodes", m.received_bytes.clone());
        r.register("tandem_kv_transfer_seconds", "First to last K/V chunk of a split request, at the decode node", m.transfer.clone());
        r.register("tandem_kv_prefill_seconds", "Prefill time of a split request on its prefill node", m.prefill.clone());
        r.register("tandem_kv_overlap_ratio", "Share of a K/V transfer hidden behind the prefill's compute", m.overlap.clone());
        r.register("tandem_split_requests", "Requests prefilled on another node and decoded here", m.split_requests.clone());
        r.register("tandem_split_fallbacks", "Split requests whose remote prefill failed and ran here instead", m.split_fallbacks.clone());
        r.register("tandem_kv_prefills_served", "Prefills run here for another node's decode", m.prefills_served.clone());
        r.register("tandem_resumed_requests", "Requests continued here after their node failed or moved them", m.resumed_requests.clone());
        r.register("tandem_migrated_out_requests", "Running requests moved to another node with their K/V", m.migrated_out.clone());
        r.register("tandem_migrated_in_requests", "Running requests taken over from another node with their K/V", m.migrated_in.clone());
        r.register(
            "tandem_kv_rejected_transfers",
            "K/V transfers rejected (malformed, out of order, foreign, cut off)",
            m.rejected_transfers.clone(),
        );
        r.register(
            "tandem_length_predictor_mean_abs_error_tokens",
            "Mean absolute error of predicted output lengths",
            m.length_error.clone(),
        );
        m
    }

    pub fn record_overlap(&self, share: f64) {
        self.overlap.observe(share);
        if let Ok(mut o) = self.recent_overlap.lock() {
            *o = Some(o.map_or(share, |x| 0.8 * x + 0.2 * share));
        }
    }
}

/// Chains of layer spans: the stage sessions this node serves and the requests it drives.
#[derive(Debug, Default)]
pub struct ChainMetrics {
    pub stage_sessions: Gauge,
    pub stage_steps: Counter,
    pub hidden_sent_bytes: Counter,
    pub hidden_received_bytes: Counter,
    pub driven_requests: Counter,
    pub rebuilds: Counter,
    pub split_prefills: Counter,
    pub handed_off_sessions: Counter,
}

impl ChainMetrics {
    fn register(r: &mut Registry) -> Self {
        let m = ChainMetrics::default();
        r.register("tandem_stage_sessions", "Sessions of other nodes' chains open on this node's layers", m.stage_sessions.clone());
        r.register("tandem_stage_steps", "Steps run here for chains", m.stage_steps.clone());
        r.register("tandem_hidden_sent_bytes", "Hidden-state bytes sent to other stages (wire bytes)", m.hidden_sent_bytes.clone());
        r.register(
            "tandem_hidden_received_bytes",
            "Hidden-state bytes received from other stages (wire bytes)",
            m.hidden_received_bytes.clone(),
        );
        r.register("tandem_chain_requests", "Requests this node drove through a chain of stages", m.driven_requests.clone());
        r.register("tandem_chain_rebuilds", "Chains rebuilt mid-request after a stage failed", m.rebuilds.clone());
        r.register(
            "tandem_chain_split_prefills",
            "Prompts of driven requests computed on a chain of prefill nodes and handed to the decode chain",
            m.split_prefills.clone(),
        );
        r.register(
            "tandem_stage_handoffs",
            "Prefill stage sessions here whose K/V the decode stage of the same span took whole",
            m.handed_off_sessions.clone(),
        );
        m
    }
}

/// Model weights shared with peers and fetched from them (`/tandem/weights/1`).
#[derive(Debug, Default)]
pub struct WeightsMetrics {
    pub sent_bytes: Counter,
    pub received_bytes: Counter,
    pub refused_peers: Counter,
    pub corrupt_chunks: Counter,
}

impl WeightsMetrics {
    fn register(r: &mut Registry) -> Self {
        let m = WeightsMetrics::default();
        r.register("tandem_weights_sent_bytes", "Model weight bytes sent to peers fetching them", m.sent_bytes.clone());
        r.register("tandem_weights_received_bytes", "Model weight bytes fetched from peers, checked and written", m.received_bytes.clone());
        r.register("tandem_weights_refused_peers", "Peers refused for a manifest or chunk that did not check out", m.refused_peers.clone());
        r.register(
            "tandem_weights_corrupt_chunks",
            "Chunks from peers whose sha256 was not the manifest's (none written)",
            m.corrupt_chunks.clone(),
        );
        m
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
