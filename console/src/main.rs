//! `tandem-console`: watch a tandem cluster, and command it with the mesh secret.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use tandem_console::app::ConsoleApp;
use tandem_console::screenshot::Screenshot;
use tandem_console::source::{SourceConfig, start};
use tandem_console::state::{ClusterState, Slo, Tab};
use tandem_mesh::MeshSecret;

/// The tandem cluster console: joins the mesh as an observer (no model, no GPU needed) and shows
/// its nodes, roles, loads, K/V streams, latencies and events; with the mesh secret it can flip
/// nodes' roles and drain them.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// A node to join the mesh through (repeatable), as `tandem serve` prints it.
    #[arg(long = "peer", env = "TANDEM_PEERS", value_delimiter = ',')]
    peer: Vec<String>,
    /// Mesh listen address (repeatable); default: a free TCP port on every interface.
    #[arg(long = "listen", env = "TANDEM_LISTEN", value_delimiter = ',')]
    listen: Vec<String>,
    /// File holding the mesh secret; the secret itself may come from TANDEM_MESH_SECRET. Without
    /// it the console is read-only.
    #[arg(long, env = "TANDEM_MESH_SECRET_FILE")]
    mesh_secret_file: Option<PathBuf>,
    /// Turn off mDNS discovery on the local network.
    #[arg(long, env = "TANDEM_NO_MDNS")]
    no_mdns: bool,
    /// Instead of joining the mesh, poll this node's cluster view (read-only), e.g.
    /// `http://127.0.0.1:8080/v1/cluster`.
    #[arg(long, conflicts_with_all = ["peer", "listen", "mesh_secret_file"])]
    url: Option<String>,
    /// TTFT objective (ms) for the SLO chart.
    #[arg(long, default_value_t = 2000.0)]
    slo_ttft_ms: f64,
    /// TPOT objective (ms) for the SLO chart.
    #[arg(long, default_value_t = 100.0)]
    slo_tpot_ms: f64,
    /// The tab shown first: nodes, requests or events.
    #[arg(long, default_value = "nodes")]
    tab: String,
    /// Save a screenshot here once `--screenshot-nodes` nodes are known and `--screenshot-after`
    /// seconds have passed, then exit.
    #[arg(long)]
    screenshot: Option<PathBuf>,
    #[arg(long, default_value_t = 10.0)]
    screenshot_after: f64,
    #[arg(long, default_value_t = 1)]
    screenshot_nodes: usize,
    /// Take the screenshot only while a K/V stream is under way.
    #[arg(long)]
    screenshot_streaming: bool,
    /// Select this node (peer id or its end) at start, showing its details.
    #[arg(long)]
    select: Option<String>,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn,tandem_console=info".into()))
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let source = match &args.url {
        Some(url) => SourceConfig::Http { url: url.clone() },
        None => SourceConfig::Mesh {
            listen: args.listen.iter().map(|a| a.parse()).collect::<Result<_, _>>()?,
            peers: args.peer.iter().map(|a| a.parse()).collect::<Result<_, _>>()?,
            secret: MeshSecret::from_file_or_env(args.mesh_secret_file.as_deref())?,
            mdns: !args.no_mdns,
        },
    };
    let tab = match args.tab.as_str() {
        "nodes" => Tab::Nodes,
        "requests" => Tab::Requests,
        "events" => Tab::Events,
        other => anyhow::bail!("unknown tab `{other}`: nodes, requests or events"),
    };
    let options = eframe::NativeOptions {
        viewport: egui::ViewportBuilder::default().with_title("tandem console").with_inner_size([1600.0, 1000.0]),
        ..Default::default()
    };
    eframe::run_native(
        "tandem-console",
        options,
        Box::new(move |cc| {
            let ctx = cc.egui_ctx.clone();
            let (feed, info) = start(source, move || ctx.request_repaint())?;
            let mut state = ClusterState::new(info);
            state.slo = Slo { ttft_ms: args.slo_ttft_ms, tpot_ms: args.slo_tpot_ms };
            state.tab = tab;
            state.pending_select = args.select.clone();
            let shot = args
                .screenshot
                .clone()
                .map(|p| (Screenshot::new(p, Duration::from_secs_f64(args.screenshot_after)), args.screenshot_nodes));
            let mut app = ConsoleApp::new(state, feed, shot);
            app.shot_streaming = args.screenshot_streaming;
            Ok(Box::new(app))
        }),
    )
    .map_err(|e| anyhow::anyhow!("the window failed: {e}"))
}
