//! `tandem serve`: one node serving many users over an OpenAI-compatible HTTP API (axum), with
//! the model on a GPU worker thread behind the continuous-batching scheduler.

pub mod config;
pub mod metrics;
pub mod openai;

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
use tandem_core::{Engine, EngineConfig, GpuContext, HostModel, TextTokenizer, WeightFormat};

pub use config::{ServeArgs, ServeConfig};
use openai::ApiError;

/// The model once it is on the GPU.
pub struct Loaded {
    pub model_id: String,
    pub worker: WorkerHandle,
    pub tokenizer: Arc<TextTokenizer>,
    pub created: u64,
    pub adapter: String,
}

enum Phase {
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

    /// The loaded model, or the 503 that explains why there is none.
    pub fn loaded(&self) -> Result<Arc<Loaded>, ApiError> {
        let phase = self.phase.read().map_err(|_| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "state lock poisoned"))?;
        match &*phase {
            Phase::Ready(l) => Ok(l.clone()),
            Phase::Loading => Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "the model is still loading")),
            Phase::Stopping(_) => Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "the server is shutting down")),
            Phase::Failed(e) => Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, format!("the model failed to load: {e}"))),
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

/// KV blocks for `bytes` of cache (or the default share), within the adapter's binding limit.
fn kv_blocks(gpu: &GpuContext, model: &HostModel, bytes: Option<u64>) -> usize {
    let row = model.config.kv_dim() as u64 * 4 * tandem_core::BLOCK_TOKENS as u64;
    let per_block = row * 2 * model.config.n_layers as u64;
    let default = if gpu.is_cpu { 1 << 30 } else { 4 << 30 };
    let wanted = bytes.unwrap_or(default) / per_block.max(1);
    // Each layer's K (and V) cache is one storage binding.
    wanted.min(gpu.max_binding() / row.max(1)).max(1) as usize
}

fn load(app: &App) -> anyhow::Result<Arc<Loaded>> {
    let cfg = &app.cfg;
    let model = load_model(&cfg.model).with_context(|| format!("loading {}", cfg.model))?;
    let gpu = GpuContext::new(cfg.adapter.as_deref())?;
    let ecfg = EngineConfig {
        max_batch_tokens: cfg.max_batch_tokens,
        kv_blocks: kv_blocks(&gpu, &model, cfg.kv_memory),
        context_length: cfg.context.unwrap_or(0),
        max_sequences: 1,
    };
    let engine = Engine::new(&gpu, &model, &ecfg)?;
    let usage = engine.kv_usage();
    tracing::info!(
        adapter = %gpu.adapter,
        kv_blocks = usage.total,
        kv_tokens = usage.total * tandem_core::BLOCK_TOKENS,
        context = engine.context_length(),
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
        adapter: gpu.adapter.to_string(),
    }))
}

async fn health(State(app): State<Arc<App>>) -> Response {
    match app.loaded() {
        Ok(l) => (StatusCode::OK, axum::Json(json!({ "status": "ok", "model": l.model_id, "adapter": l.adapter }))).into_response(),
        Err(e) => (e.status, axum::Json(json!({ "status": "unavailable", "reason": e.message }))).into_response(),
    }
}

async fn models(State(app): State<Arc<App>>) -> Response {
    let created = app.loaded().map(|l| l.created).unwrap_or(0);
    axum::Json(json!({
        "object": "list",
        "data": [{ "id": app.model_id, "object": "model", "created": created, "owned_by": "tandem" }],
    }))
    .into_response()
}

async fn prometheus(State(app): State<Arc<App>>) -> Response {
    ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], app.metrics.render()).into_response()
}

async fn not_found() -> Response {
    ApiError::new(StatusCode::NOT_FOUND, "no such endpoint").into_response()
}

/// The HTTP routes.
pub fn router(app: Arc<App>) -> Router {
    let limit = app.cfg.max_body;
    Router::new()
        .route("/v1/completions", post(openai::completions))
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/metrics", get(prometheus))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(limit))
        .with_state(app)
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

/// Serves until SIGINT or SIGTERM, then lets in-flight requests finish (for up to the grace
/// period, after which they are cancelled) and stops.
pub async fn serve(cfg: ServeConfig) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(cfg.http).await.with_context(|| format!("binding {}", cfg.http))?;
    let addr = listener.local_addr()?;
    let grace = Duration::from_secs(cfg.shutdown_grace);
    let app = Arc::new(App { model_id: model_id(&cfg.model), cfg, metrics: metrics::Metrics::new(), phase: RwLock::new(Phase::Loading) });
    // Scripts and tests read the address (the port may have been 0) from this line.
    println!("tandem: listening on http://{addr}");
    tracing::info!(%addr, model = %app.model_id, "listening; loading the model");

    let loader = app.clone();
    tokio::task::spawn_blocking(move || {
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
    let shutdown = async move {
        signal().await;
        tracing::info!(grace_s = grace.as_secs(), "shutting down: finishing in-flight requests");
        if let Some(w) = stopper.begin_stopping() {
            w.request_stop(true);
        }
        let late = stopper.clone();
        tokio::spawn(async move {
            tokio::time::sleep(grace).await;
            if let Some(w) = late.worker() {
                tracing::warn!("grace period over: cancelling what is left");
                w.request_stop(false);
            }
        });
    };
    axum::serve(listener, router(app.clone())).with_graceful_shutdown(shutdown).await?;
    if let Some(w) = app.worker() {
        w.request_stop(false);
        tokio::task::spawn_blocking(move || w.join()).await?;
    }
    tracing::info!("stopped");
    Ok(())
}
