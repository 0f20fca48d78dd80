//! Where the console's snapshots come from, and where its orders go: it joins the mesh as an
//! observer (snapshots of its own cluster view; orders signed with the mesh secret and sent over
//! `/tandem/control/1`), or polls a node's `/v1/cluster` (read-only). Runs on its own thread with
//! a tokio runtime and hands results to the UI through a channel.

use std::sync::mpsc;
use std::time::Duration;

use tandem_mesh::{
    CONTROL_LIMITS, CONTROL_PROTOCOL, CapabilityAd, ClusterSnapshot, ControlReply, ControlRequest, FramedStream, LoadReport, MeshConfig,
    MeshSecret, Multiaddr, PeerId, Role,
};

use crate::state::{ControlOrder, SourceInfo};

/// How to reach the cluster.
#[derive(Clone, Debug)]
pub enum SourceConfig {
    Mesh { listen: Vec<Multiaddr>, peers: Vec<Multiaddr>, secret: Option<MeshSecret>, mdns: bool },
    Http { url: String },
}

/// What the feed hands the UI.
#[derive(Debug)]
pub enum Update {
    Snapshot(Box<ClusterSnapshot>),
    Reply(ControlOrder, Result<ControlReply, String>),
    /// The source's state in words ("mesh: 3 peers", "cannot reach ...").
    Status(String),
}

/// The running feed.
pub struct Feed {
    pub updates: mpsc::Receiver<Update>,
    orders: tokio::sync::mpsc::UnboundedSender<ControlOrder>,
}

impl Feed {
    /// Sends a confirmed order (its reply arrives as an update).
    pub fn send(&self, order: ControlOrder) {
        let _ = self.orders.send(order);
    }
}

/// How often the UI gets a snapshot.
const SNAPSHOT_EVERY: Duration = Duration::from_millis(500);

/// Starts the feed; `wake` is called after each update (the UI repaints).
pub fn start(cfg: SourceConfig, wake: impl Fn() + Send + Sync + 'static) -> anyhow::Result<(Feed, SourceInfo)> {
    let (tx, updates) = mpsc::channel();
    let (orders, order_rx) = tokio::sync::mpsc::unbounded_channel();
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().thread_name("console-feed").build()?;
    let info = match &cfg {
        SourceConfig::Mesh { secret: Some(s), .. } => SourceInfo {
            label: format!("mesh (secret {})", s.fingerprint()),
            can_control: true,
            why_not: String::new(),
        },
        SourceConfig::Mesh { secret: None, .. } => SourceInfo {
            label: "open mesh".into(),
            can_control: false,
            why_not: "Control messages are signed with the mesh secret: start the console with --mesh-secret-file (or TANDEM_MESH_SECRET) of a private mesh.".into(),
        },
        SourceConfig::Http { url } => SourceInfo {
            label: url.clone(),
            can_control: false,
            why_not: "Polling a node's /v1/cluster is read-only: join the mesh with its secret to command nodes.".into(),
        },
    };
    let wake = std::sync::Arc::new(wake);
    match cfg {
        SourceConfig::Mesh { listen, peers, secret, mdns } => {
            let _guard = runtime.enter();
            let mut mc = MeshConfig::new(tandem_mesh::Keypair::generate_ed25519());
            mc.listen = if listen.is_empty() { vec!["/ip4/0.0.0.0/tcp/0".parse()?] } else { listen };
            mc.bootstrap = peers;
            mc.secret = secret;
            mc.mdns = mdns;
            let mesh = tandem_mesh::Mesh::start(mc)?;
            runtime.spawn(mesh_loop(mesh, secret, tx, order_rx, wake));
        }
        SourceConfig::Http { url } => {
            runtime.spawn(http_loop(url, tx, wake));
        }
    }
    // The runtime lives as long as the process: the console's window is the process.
    std::thread::Builder::new().name("console-runtime".into()).spawn(move || runtime.block_on(std::future::pending::<()>()))?;
    Ok((Feed { updates, orders }, info))
}

async fn mesh_loop(
    mesh: tandem_mesh::MeshHandle,
    secret: Option<MeshSecret>,
    tx: mpsc::Sender<Update>,
    mut orders: tokio::sync::mpsc::UnboundedReceiver<ControlOrder>,
    wake: std::sync::Arc<impl Fn() + Send + Sync + 'static>,
) {
    // An observer that speaks: nodes forget (and disconnect) peers that never report.
    let ad = CapabilityAd { role: Role::Observer, version: env!("CARGO_PKG_VERSION").into(), ..Default::default() };
    let _ = mesh.set_capability(ad).await;
    let mut tick = tokio::time::interval(SNAPSHOT_EVERY);
    let mut n = 0u64;
    loop {
        tokio::select! {
            _ = tick.tick() => {
                if n.is_multiple_of(2) && mesh.publish_load(LoadReport::default()).await.is_err() {
                    let _ = tx.send(Update::Status("the mesh stopped".into()));
                    return;
                }
                n += 1;
                if tx.send(Update::Snapshot(Box::new(mesh.snapshot()))).is_err() {
                    return;
                }
                wake();
            }
            Some(order) = orders.recv() => {
                let (mesh, tx, wake) = (mesh.clone(), tx.clone(), wake.clone());
                tokio::spawn(async move {
                    let result = match secret {
                        Some(s) => send_order(&mesh, &s, &order).await,
                        None => Err("the console has no mesh secret".into()),
                    };
                    let _ = tx.send(Update::Reply(order, result));
                    wake();
                });
            }
        }
    }
}

/// Signs `order` and sends it to its node; the node's answer.
pub async fn send_order(mesh: &tandem_mesh::MeshHandle, secret: &MeshSecret, order: &ControlOrder) -> Result<ControlReply, String> {
    let peer: PeerId = order.target.parse().map_err(|e| format!("bad peer id: {e}"))?;
    let stream = mesh.open_stream(peer, CONTROL_PROTOCOL).await.map_err(|e| e.to_string())?;
    let mut s = FramedStream::new(stream, CONTROL_LIMITS);
    let req = ControlRequest::sign(secret, &order.target, order.command, tandem_mesh::unix_ms());
    s.send_msg(&req).await.map_err(|e| e.to_string())?;
    s.finish().await.map_err(|e| e.to_string())?;
    s.recv_msg::<ControlReply>().await.map_err(|e| e.to_string())?.ok_or_else(|| "the node closed the stream without an answer".into())
}

async fn http_loop(url: String, tx: mpsc::Sender<Update>, wake: std::sync::Arc<impl Fn() + Send + Sync + 'static>) {
    let client = match reqwest::Client::builder().timeout(Duration::from_secs(5)).build() {
        Ok(c) => c,
        Err(e) => {
            let _ = tx.send(Update::Status(format!("no HTTP client: {e}")));
            return;
        }
    };
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        let got = async {
            let r = client.get(&url).send().await.map_err(|e| e.to_string())?.error_for_status().map_err(|e| e.to_string())?;
            r.json::<ClusterSnapshot>().await.map_err(|e| format!("not a cluster snapshot: {e}"))
        }
        .await;
        let update = match got {
            Ok(s) => Update::Snapshot(Box::new(s)),
            Err(e) => Update::Status(format!("{url}: {e}")),
        };
        if tx.send(update).is_err() {
            return;
        }
        wake();
    }
}
