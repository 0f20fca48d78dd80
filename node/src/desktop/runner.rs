//! Carries out the desktop app's orders on a tokio runtime of its own: fetches the default model
//! (its progress read from a hidden progress bar), runs `tandem serve` in this process until
//! Stop, polls the node's `/v1/cluster`, and streams chat answers from the node's API.

use std::sync::mpsc;
use std::time::Duration;

use futures_util::StreamExt;
use tandem_mesh::ClusterSnapshot;

use super::{ChatLine, ChatTarget, NodeStatus, Order, Settings};
use crate::serve::ServeArgs;

/// What the runner tells the UI.
#[derive(Debug)]
pub enum Update {
    Status(NodeStatus),
    /// The node is up: its HTTP API and peer id.
    Started {
        http: String,
        peer_id: String,
    },
    Snapshot(Box<ClusterSnapshot>),
    ChatPiece(String),
    ChatDone(Option<String>),
}

pub struct Runner {
    pub updates: mpsc::Receiver<Update>,
    tx: mpsc::Sender<Update>,
    runtime: tokio::runtime::Runtime,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    http: std::sync::Arc<std::sync::Mutex<Option<String>>>,
    wake: std::sync::Arc<dyn Fn() + Send + Sync>,
}

impl Runner {
    pub fn new(wake: impl Fn() + Send + Sync + 'static) -> std::io::Result<Self> {
        let (tx, updates) = mpsc::channel();
        let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().thread_name("desktop-node").build()?;
        Ok(Runner { updates, tx, runtime, stop: None, http: Default::default(), wake: std::sync::Arc::new(wake) })
    }

    pub fn order(&mut self, order: Order) {
        match order {
            Order::Start(settings) => self.start(settings),
            Order::Stop => {
                if let Some(stop) = self.stop.take() {
                    let _ = stop.send(());
                }
            }
            Order::Chat { target, messages } => {
                let (tx, wake, http) = (self.tx.clone(), self.wake.clone(), self.http.lock().ok().and_then(|h| h.clone()));
                self.runtime.spawn(async move {
                    let result = match http {
                        Some(h) => chat(&h, target, &messages, &tx, &*wake).await,
                        None => Err("the node is not running".into()),
                    };
                    let _ = tx.send(Update::ChatDone(result.err()));
                    wake();
                });
            }
        }
    }

    fn start(&mut self, settings: Settings) {
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        self.stop = Some(stop_tx);
        let (tx, wake, http_slot) = (self.tx.clone(), self.wake.clone(), self.http.clone());
        let send = move |u: Update| {
            let _ = tx.send(u);
            wake();
        };
        self.runtime.spawn(async move {
            let result = run_node(settings, stop_rx, &send, &http_slot).await;
            if let Ok(mut h) = http_slot.lock() {
                *h = None;
            }
            send(Update::Status(match result {
                Ok(()) => NodeStatus::Stopped,
                Err(e) => NodeStatus::Failed(format!("{e:#}")),
            }));
        });
    }
}

/// A free port on loopback for the node's API (the address is needed before the node starts).
fn free_port_address(wanted: &str) -> anyhow::Result<std::net::SocketAddr> {
    let mut addr: std::net::SocketAddr = wanted.trim().parse().map_err(|e| anyhow::anyhow!("HTTP address `{wanted}`: {e}"))?;
    if addr.port() == 0 {
        addr.set_port(std::net::TcpListener::bind(addr)?.local_addr()?.port());
    }
    Ok(addr)
}

async fn run_node(
    settings: Settings,
    stop: tokio::sync::oneshot::Receiver<()>,
    send: &(impl Fn(Update) + Send + Sync + 'static + Clone),
    http_slot: &std::sync::Mutex<Option<String>>,
) -> anyhow::Result<()> {
    let model = settings.model.trim().to_string();
    if model == crate::models::DEFAULT_MODEL.id && !crate::models::cached_path(&crate::models::DEFAULT_MODEL).exists() {
        fetch_default(send).await?;
    }
    send(Update::Status(NodeStatus::Starting));
    let addr = free_port_address(&settings.http)?;
    let args = ServeArgs {
        model: Some(model),
        http: Some(addr),
        role: Some(settings.role),
        adapter: Some(settings.adapter.trim().to_string()).filter(|a| !a.is_empty()),
        mesh_secret_file: Some(settings.mesh_secret_file.trim().into()).filter(|p: &std::path::PathBuf| !p.as_os_str().is_empty()),
        peer: settings.peers.lines().map(str::trim).filter(|l| !l.is_empty()).map(String::from).collect(),
        ..Default::default()
    };
    let cfg = args.resolve()?;
    let http = format!("http://{addr}");
    if let Ok(mut h) = http_slot.lock() {
        *h = Some(http.clone());
    }
    let watcher = tokio::spawn(watch(http, send.clone()));
    let stop = async {
        let _ = stop.await;
    };
    let result = crate::serve::serve_until(cfg, stop).await;
    watcher.abort();
    result
}

/// Fetches the default model, reporting its progress.
async fn fetch_default(send: &(impl Fn(Update) + Send + Sync + 'static + Clone)) -> anyhow::Result<()> {
    let bar = indicatif::ProgressBar::hidden();
    let fetching = {
        let bar = bar.clone();
        tokio::task::spawn_blocking(move || crate::models::fetch_model_with(&crate::models::DEFAULT_MODEL, &bar))
    };
    tokio::pin!(fetching);
    loop {
        tokio::select! {
            done = &mut fetching => {
                done??;
                return Ok(());
            }
            () = tokio::time::sleep(Duration::from_millis(100)) => {
                send(Update::Status(NodeStatus::Fetching {
                    step: bar.message(),
                    done: bar.position(),
                    total: bar.length().unwrap_or(0),
                }));
            }
        }
    }
}

/// Polls the node until it answers, then reports its view of the mesh every second.
async fn watch(http: String, send: impl Fn(Update) + Send + Sync + 'static) {
    let Ok(client) = reqwest::Client::builder().timeout(Duration::from_secs(3)).build() else { return };
    let (mut started, mut announced) = (false, false);
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tick.tick().await;
        if !started {
            let ready = async { client.get(format!("{http}/health")).send().await.ok()?.error_for_status().ok() }.await;
            if ready.is_none() {
                continue;
            }
            started = true;
            send(Update::Status(NodeStatus::Running));
        }
        let snap = async { client.get(format!("{http}/v1/cluster")).send().await.ok()?.json::<ClusterSnapshot>().await.ok() }.await;
        if let Some(s) = snap {
            if !announced {
                announced = true;
                send(Update::Started { http: http.clone(), peer_id: s.self_id.clone() });
            }
            send(Update::Snapshot(Box::new(s)));
        }
    }
}

/// Streams the answer to `messages` from the node's chat API.
async fn chat(
    http: &str,
    target: ChatTarget,
    messages: &[ChatLine],
    tx: &mpsc::Sender<Update>,
    wake: &(dyn Fn() + Send + Sync),
) -> Result<(), String> {
    let client = reqwest::Client::builder().timeout(Duration::from_secs(600)).build().map_err(|e| e.to_string())?;
    let models: serde_json::Value =
        client.get(format!("{http}/v1/models")).send().await.map_err(|e| e.to_string())?.json().await.map_err(|e| e.to_string())?;
    let model = models["data"][0]["id"].as_str().ok_or("no model is served")?.to_string();
    let body = serde_json::json!({
        "model": model,
        "stream": true,
        "max_tokens": 256,
        "temperature": 0,
        "messages": messages.iter().filter(|m| !m.text.is_empty()).map(|m| serde_json::json!({
            "role": if m.user { "user" } else { "assistant" },
            "content": m.text,
        })).collect::<Vec<_>>(),
    });
    let placement = match target {
        ChatTarget::Local => "local",
        ChatTarget::Mesh => "mesh",
    };
    let resp = client
        .post(format!("{http}/v1/chat/completions"))
        .header(crate::serve::api::PLACEMENT_HEADER, placement)
        .json(&body)
        .send()
        .await
        .map_err(|e| e.to_string())?;
    if !resp.status().is_success() {
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        let message = serde_json::from_str::<serde_json::Value>(&text).ok().and_then(|v| v["error"]["message"].as_str().map(String::from));
        return Err(format!("{status}: {}", message.unwrap_or(text)));
    }
    // Server-sent events: `data: {json}` lines, ending with `data: [DONE]`.
    let mut stream = resp.bytes_stream();
    let mut pending = String::new();
    while let Some(chunk) = stream.next().await {
        pending.push_str(&String::from_utf8_lossy(&chunk.map_err(|e| e.to_string())?));
        while let Some(end) = pending.find('\n') {
            let line: String = pending.drain(..=end).collect();
            let Some(data) = line.trim().strip_prefix("data:").map(str::trim) else { continue };
            if data == "[DONE]" {
                return Ok(());
            }
            let v: serde_json::Value = serde_json::from_str(data).map_err(|e| format!("bad event: {e}"))?;
            if let Some(e) = v["error"]["message"].as_str() {
                return Err(e.to_string());
            }
            if let Some(piece) = v["choices"][0]["delta"]["content"].as_str() {
                let _ = tx.send(Update::ChatPiece(piece.to_string()));
                wake();
            }
        }
    }
    Ok(())
}
