//! The log of mesh events, newest first: joins, leaves, lost nodes, role flips, operators'
//! commands, refused connections, failures and re-placements (those reported by the node that saw
//! them).

use egui::{Color32, Ui};
use egui_extras::{Column, TableBuilder};
use tandem_mesh::{MeshEventKind, short};

use crate::state::ClusterState;

fn color(kind: MeshEventKind) -> Color32 {
    match kind {
        MeshEventKind::Joined => Color32::from_rgb(120, 220, 120),
        MeshEventKind::Left | MeshEventKind::Control => Color32::from_rgb(150, 170, 250),
        MeshEventKind::RoleChanged => Color32::from_rgb(200, 140, 250),
        MeshEventKind::Lost | MeshEventKind::Distrusted => Color32::from_rgb(240, 90, 80),
        MeshEventKind::Refused | MeshEventKind::Rerouted => Color32::from_rgb(240, 180, 70),
    }
}

pub fn events(ui: &mut Ui, s: &ClusterState) {
    let events: Vec<_> = s.events.iter().rev().collect();
    TableBuilder::new(ui)
        .striped(true)
        .auto_shrink(false)
        .column(Column::exact(70.0))
        .column(Column::exact(90.0))
        .column(Column::exact(70.0))
        .column(Column::remainder().clip(true))
        .header(20.0, |mut h| {
            for name in ["Time", "Event", "Node", "Detail"] {
                h.col(|ui| {
                    ui.strong(name);
                });
            }
        })
        .body(|body| {
            body.rows(18.0, events.len(), |mut row| {
                let e = events[row.index()];
                row.col(|ui| {
                    ui.label(super::clock(e.at_ms));
                });
                row.col(|ui| {
                    ui.colored_label(color(e.kind), format!("{:?}", e.kind).to_lowercase());
                });
                row.col(|ui| {
                    ui.label(short(&e.peer_id)).on_hover_text(&e.peer_id);
                });
                row.col(|ui| {
                    ui.label(&e.detail);
                });
            });
        });
}
