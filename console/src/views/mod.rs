//! The console's views, each a function of the state: a summary bar, the node graph beside the
//! charts, tabs for the node table, the request timeline and the event log, the selected node's
//! details and actions, and the confirmation of an action.

pub mod charts;
pub mod events;
pub mod graph;
pub mod table;
pub mod timeline;

use egui::{Align2, Color32, RichText, Ui};
use tandem_mesh::{ControlCommand, Role};

use crate::state::{ClusterState, FlowKind, NodeRow, Tab, role_name};

/// A coloured dot and a label (the default fonts have no bullet glyphs).
pub fn swatch(ui: &mut Ui, color: Color32, text: impl Into<RichText>) -> egui::Response {
    let (rect, _) = ui.allocate_exact_size(egui::vec2(10.0, 10.0), egui::Sense::hover());
    ui.painter().circle_filled(rect.center(), 4.5, color);
    ui.colored_label(color, text)
}

pub fn role_color(role: Option<Role>) -> Color32 {
    match role {
        Some(Role::Prefill) => Color32::from_rgb(235, 150, 50),
        Some(Role::Decode) => Color32::from_rgb(80, 150, 235),
        Some(Role::Both | Role::Auto) => Color32::from_rgb(170, 110, 230),
        Some(Role::Observer) => Color32::from_rgb(150, 150, 150),
        None => Color32::from_rgb(90, 90, 90),
    }
}

/// The role as the table shows it: "decode (auto)", "prefill, draining".
pub fn role_label(n: &NodeRow) -> String {
    let mut s = role_name(n.role).to_string();
    if n.auto_role {
        s.push_str(" (auto)");
    }
    if n.draining {
        s.push_str(", draining");
    }
    s
}

pub fn bytes(b: u64) -> String {
    let b = b as f64;
    match b {
        b if b >= 1e9 => format!("{:.1} GB", b / 1e9),
        b if b >= 1e6 => format!("{:.0} MB", b / 1e6),
        b => format!("{:.0} kB", b / 1e3),
    }
}

pub fn bytes_per_s(b: f64) -> String {
    match b {
        b if b >= 1e9 => format!("{:.2} GB/s", b / 1e9),
        b if b >= 1e6 => format!("{:.1} MB/s", b / 1e6),
        b => format!("{:.0} kB/s", b / 1e3),
    }
}

/// A measured speed: whole numbers, but small ones (CPU adapters) with a decimal.
pub fn speed(v: f64) -> String {
    if v < 10.0 { format!("{v:.1}") } else { format!("{v:.0}") }
}

pub fn duration(ms: f64) -> String {
    if ms >= 1000.0 { format!("{:.1} s", ms / 1e3) } else { format!("{ms:.0} ms") }
}

/// Unix milliseconds as a UTC time of day.
pub fn clock(ms: u64) -> String {
    let s = ms / 1000 % 86_400;
    format!("{:02}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
}

/// The whole console.
pub fn console(ui: &mut Ui, s: &mut ClusterState) {
    egui::Panel::top("summary").show(ui, |ui| summary(ui, s));
    if s.selected.is_some() {
        egui::Panel::right("details").resizable(true).default_size(300.0).show(ui, |ui| details(ui, s));
    }
    egui::Panel::bottom("tabs").resizable(true).default_size(380.0).min_size(240.0).show(ui, |ui| {
        ui.horizontal(|ui| {
            for (tab, name) in [(Tab::Nodes, "Nodes"), (Tab::Requests, "Requests"), (Tab::Events, "Events")] {
                ui.selectable_value(&mut s.tab, tab, RichText::new(name).strong());
            }
        });
        ui.separator();
        match s.tab {
            Tab::Nodes => table::table(ui, s),
            Tab::Requests => timeline::timeline(ui, s.traces.iter()),
            Tab::Events => events::events(ui, s),
        }
    });
    egui::CentralPanel::default().show(ui, |ui| {
        ui.columns(2, |cols| {
            graph::graph(&mut cols[0], s);
            charts::charts(&mut cols[1], s);
        });
    });
    confirm(ui, s);
}

fn summary(ui: &mut Ui, s: &ClusterState) {
    ui.horizontal_wrapped(|ui| {
        ui.heading("tandem");
        ui.separator();
        ui.label(RichText::new(format!("{} nodes", s.nodes.len())).strong());
        for (role, count) in s.role_counts() {
            swatch(ui, role_color(role), format!("{count} {}", role_name(role)));
        }
        ui.separator();
        let last = s.history.back().copied().unwrap_or_default();
        ui.label(format!("{:.1} tok/s", last.tokens_per_s));
        ui.label(format!("{} running · {} waiting", last.running, last.waiting));
        for (kind, what) in [(FlowKind::Kv, "K/V"), (FlowKind::Hidden, "hidden states")] {
            let flows: Vec<f64> = s.flows.iter().filter(|f| f.kind == kind).map(|f| f.bytes_per_s).collect();
            if kind == FlowKind::Kv || !flows.is_empty() {
                let total = flows.iter().sum::<f64>();
                ui.colored_label(graph::flow_color(kind), format!("{what} {} over {} streams", bytes_per_s(total), flows.len()));
            }
        }
        ui.separator();
        ui.weak(&s.source.label);
        if s.source.can_control {
            ui.colored_label(Color32::from_rgb(120, 220, 120), "control: on (mesh secret)");
        } else {
            ui.weak("read-only").on_hover_text(&s.source.why_not);
        }
    });
    chains(ui, s);
    if let Some(r) = s.replies.back() {
        ui.weak(r);
    }
}

/// The best chains of nodes holding spans of a model: which node runs which layers.
fn chains(ui: &mut Ui, s: &ClusterState) {
    for c in &s.chains {
        ui.horizontal_wrapped(|ui| {
            ui.label(RichText::new(format!("chain · {}", c.model)).strong());
            let stages = |stages: &[tandem_mesh::StageSnapshot]| {
                stages
                    .iter()
                    .map(|st| format!("{} [{}–{})", tandem_mesh::short(&st.peer_id), st.layers[0], st.layers[1]))
                    .collect::<Vec<_>>()
                    .join(" -> ")
            };
            if !c.prefill.is_empty() {
                ui.colored_label(role_color(Some(Role::Prefill)), format!("prefill {}", stages(&c.prefill)));
                ui.weak("hands K/V to");
            }
            ui.colored_label(graph::HIDDEN_COLOR, stages(&c.stages));
            ui.weak(format!("~{:.1} ms/token", c.expected_tpot_ms));
        });
    }
}

fn details(ui: &mut Ui, s: &mut ClusterState) {
    let Some(n) = s.selected.as_ref().and_then(|p| s.nodes.get(p)).cloned() else { return };
    ui.horizontal(|ui| {
        ui.heading(format!("Node {}", n.short));
        if ui.small_button("Close").clicked() {
            s.selected = None;
        }
    });
    ui.label(RichText::new(&n.peer_id).small().monospace());
    egui::Grid::new("node-details").num_columns(2).striped(true).show(ui, |ui| {
        let mut row = |k: &str, v: String| {
            ui.label(k);
            ui.label(v);
            ui.end_row();
        };
        row("Role", role_label(&n));
        row("Adapter", format!("{} ({}, {})", n.adapter, n.backend, n.device_type));
        row("Memory", n.memory_bytes.map_or("–".into(), bytes));
        row("Speed", format!("{} GFLOP/s · {} GB/s", speed(n.gflops), speed(n.gbps)));
        row("Models", n.models.join(", "));
        row("Sequences", format!("{} running · {} waiting", n.running, n.waiting));
        row("K/V cache", format!("{:.0}% of {} blocks", n.kv_used() * 100.0, n.kv_blocks_total));
        row("Tokens/s", format!("{:.1}", n.tokens_per_s));
        row("Split requests", n.split_requests.to_string());
        row("HTTP", n.http.clone().unwrap_or_default());
    });
    ui.separator();
    ui.strong("Actions");
    if n.role == Some(Role::Observer) && n.models.is_empty() {
        ui.weak("An observer runs no model: nothing to command.");
        return;
    }
    let enabled = s.source.can_control;
    let why = s.source.why_not.clone();
    ui.horizontal_wrapped(|ui| {
        for role in [Role::Prefill, Role::Decode, Role::Both, Role::Auto] {
            let current = n.role == Some(role) && !n.auto_role || role == Role::Auto && n.auto_role;
            let b = ui.add_enabled(enabled && !current, egui::Button::new(format!("Make {role}"))).on_disabled_hover_text(&why);
            if b.clicked() {
                s.propose(&n.peer_id, ControlCommand::SetRole { role });
            }
        }
    });
    let (label, drain) = if n.draining { ("Undrain", false) } else { ("Drain", true) };
    if ui.add_enabled(enabled, egui::Button::new(label)).on_disabled_hover_text(&why).clicked() {
        s.propose(&n.peer_id, ControlCommand::Drain { drain });
    }
}

fn confirm(ui: &mut Ui, s: &mut ClusterState) {
    let Some(order) = s.pending.clone() else { return };
    let mut answer = None;
    egui::Window::new("Please confirm").collapsible(false).resizable(false).anchor(Align2::CENTER_CENTER, [0.0, 0.0]).show(
        ui.ctx(),
        |ui| {
            let what = match order.command {
                ControlCommand::SetRole { role } => {
                    format!("Set node {} to {role}? Its in-flight requests finish first.", tandem_mesh::short(&order.target))
                }
                ControlCommand::Drain { drain: true } => format!(
                    "Drain node {}? It stops taking requests, and its running requests move to other decode nodes.",
                    tandem_mesh::short(&order.target)
                ),
                ControlCommand::Drain { drain: false } => {
                    format!("Undrain node {}? It takes requests again.", tandem_mesh::short(&order.target))
                }
            };
            ui.label(what);
            ui.horizontal(|ui| {
                if ui.button("Confirm").clicked() {
                    answer = Some(true);
                }
                if ui.button("Cancel").clicked() {
                    answer = Some(false);
                }
            });
        },
    );
    match answer {
        Some(true) => s.confirm(),
        Some(false) => s.cancel(),
        None => {}
    }
}
