//! `tandem-desktop`: turn this machine's GPU into a tandem node, with a window.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use tandem_console::screenshot::Screenshot;
use tandem_node::desktop::runner::{Runner, Update};
use tandem_node::desktop::{DesktopState, NodeStatus, Order, Settings};

/// A tandem node with a window: choose a model, a role and the mesh, start it, watch its GPU and
/// load, and try the model. The settings are remembered between runs; flags override them.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    #[arg(long)]
    model: Option<String>,
    #[arg(long)]
    role: Option<tandem_mesh::Role>,
    /// A peer to join through (repeatable).
    #[arg(long = "peer")]
    peer: Vec<String>,
    #[arg(long)]
    mesh_secret_file: Option<PathBuf>,
    #[arg(long)]
    http: Option<String>,
    /// Start the node at once.
    #[arg(long)]
    start: bool,
    /// Once the node runs, ask it this in the chat.
    #[arg(long)]
    chat: Option<String>,
    /// Ask through the mesh rather than this node's GPU.
    #[arg(long)]
    chat_mesh: bool,
    /// Save a screenshot here once the node runs (and the chat, if any, was answered) and
    /// `--screenshot-after` seconds have passed, then exit.
    #[arg(long)]
    screenshot: Option<PathBuf>,
    #[arg(long, default_value_t = 5.0)]
    screenshot_after: f64,
}

struct DesktopApp {
    state: DesktopState,
    runner: Runner,
    files: Option<egui_file::FileDialog>,
    chat: Option<String>,
    screenshot: Option<Screenshot>,
    /// The clock the mesh view's samples are timed by.
    started: std::time::Instant,
}

impl eframe::App for DesktopApp {
    fn ui(&mut self, ui: &mut egui::Ui, _frame: &mut eframe::Frame) {
        while let Ok(u) = self.runner.updates.try_recv() {
            match u {
                Update::Status(s) => {
                    // A stop asked for stays "stopping" until the node has stopped.
                    if !(self.state.status == NodeStatus::Stopping && s == NodeStatus::Running) {
                        self.state.status = s;
                    }
                }
                Update::Started { http, peer_id } => {
                    self.state.http = Some(http);
                    self.state.peer_id = Some(peer_id);
                }
                Update::Snapshot(s) => self.state.cluster.apply(&s, self.started.elapsed().as_secs_f64()),
                Update::ChatPiece(p) => self.state.answer_piece(&p),
                Update::ChatDone(e) => self.state.answer_done(e),
            }
        }
        if self.state.status == NodeStatus::Running
            && self.state.peer_id.is_some()
            && let Some(prompt) = self.chat.take()
        {
            self.state.input = prompt;
            self.state.send_chat();
        }
        tandem_node::desktop::view(ui, &mut self.state, &mut self.files);
        for order in std::mem::take(&mut self.state.orders) {
            self.runner.order(order);
        }
        if let Some(shot) = &mut self.screenshot {
            let answered = self.chat.is_none() && !self.state.answering;
            shot.tick(ui.ctx(), self.state.status == NodeStatus::Running && self.state.peer_id.is_some() && answered);
        }
        ui.ctx().request_repaint_after(Duration::from_secs(1));
    }

    fn save(&mut self, storage: &mut dyn eframe::Storage) {
        eframe::set_value(storage, eframe::APP_KEY, &self.state.settings);
    }

    fn on_exit(&mut self) {
        self.runner.order(Order::Stop);
        // Give the node a moment to leave the mesh cleanly.
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,wgpu_core=warn,wgpu_hal=warn,naga=warn,libp2p_kad=error".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let options = eframe::NativeOptions {
        viewport: egui::ViewportBuilder::default().with_title("tandem node").with_inner_size([1400.0, 860.0]),
        ..Default::default()
    };
    eframe::run_native(
        "tandem-desktop",
        options,
        Box::new(move |cc| {
            let mut settings: Settings = cc.storage.and_then(|s| eframe::get_value(s, eframe::APP_KEY)).unwrap_or_default();
            if let Some(m) = args.model {
                settings.model = m;
            }
            if let Some(r) = args.role {
                settings.role = r;
            }
            if !args.peer.is_empty() {
                settings.peers = args.peer.join("\n");
            }
            if let Some(p) = args.mesh_secret_file {
                settings.mesh_secret_file = p.display().to_string();
            }
            if let Some(h) = args.http {
                settings.http = h;
            }
            let ctx = cc.egui_ctx.clone();
            let mut runner = Runner::new(move || ctx.request_repaint())?;
            let mut state = DesktopState::new(settings);
            if args.chat_mesh {
                state.target = tandem_node::desktop::ChatTarget::Mesh;
            }
            if args.start {
                state.status = NodeStatus::Starting;
                runner.order(Order::Start(state.settings.clone()));
            }
            let screenshot = args.screenshot.map(|p| Screenshot::new(p, Duration::from_secs_f64(args.screenshot_after)));
            Ok(Box::new(DesktopApp { state, runner, files: None, chat: args.chat, screenshot, started: std::time::Instant::now() }))
        }),
    )
    .map_err(|e| anyhow::anyhow!("the window failed: {e}"))
}
