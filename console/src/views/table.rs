//! The node table: one row per node, sortable by any column, filtered by a search box; a click
//! on a node's id selects it (its details and actions open on the right).

use egui::{Color32, ProgressBar, RichText, Ui};
use egui_extras::{Column, TableBuilder};

use super::{bytes, role_color, role_label};
use crate::state::{ClusterState, SortKey};

const COLUMNS: [(&str, Option<SortKey>); 13] = [
    ("Node", Some(SortKey::Node)),
    ("Role", Some(SortKey::Role)),
    ("Adapter", Some(SortKey::Adapter)),
    ("Backend", None),
    ("Memory", None),
    ("GFLOP/s", Some(SortKey::Gflops)),
    ("GB/s", Some(SortKey::Gbps)),
    ("Model", None),
    ("Running", Some(SortKey::Running)),
    ("Waiting", Some(SortKey::Waiting)),
    ("K/V used", Some(SortKey::Kv)),
    ("tok/s", Some(SortKey::TokensPerS)),
    ("TTFT p50", None),
];

pub fn table(ui: &mut Ui, s: &mut ClusterState) {
    ui.horizontal(|ui| {
        ui.label("Filter:");
        ui.add(egui::TextEdit::singleline(&mut s.filter).hint_text("id, role, adapter, backend or model").desired_width(260.0));
        let shown = s.table_rows().len();
        ui.label(format!("{shown} of {} nodes", s.nodes.len()));
    });
    let rows: Vec<_> = s.table_rows().into_iter().cloned().collect();
    let mut clicked_sort = None;
    let mut clicked_row = None;
    TableBuilder::new(ui)
        .striped(true)
        .auto_shrink(false)
        .column(Column::exact(90.0))
        .column(Column::exact(80.0))
        .column(Column::initial(200.0).at_least(80.0).clip(true))
        .column(Column::exact(60.0))
        .column(Column::exact(70.0))
        .columns(Column::exact(70.0), 2)
        .column(Column::initial(120.0).clip(true))
        .columns(Column::exact(74.0), 2)
        .column(Column::exact(110.0))
        .column(Column::exact(60.0))
        .column(Column::remainder().at_least(60.0))
        .header(22.0, |mut header| {
            for (name, key) in COLUMNS {
                header.col(|ui| match key {
                    Some(k) => {
                        let arrow = if s.sort == k { if s.descending { " v" } else { " ^" } } else { "" };
                        if ui.button(RichText::new(format!("{name}{arrow}")).strong()).clicked() {
                            clicked_sort = Some(k);
                        }
                    }
                    None => {
                        ui.strong(name);
                    }
                });
            }
        })
        .body(|body| {
            body.rows(20.0, rows.len(), |mut row| {
                let n = &rows[row.index()];
                row.col(|ui| {
                    let selected = s.selected.as_deref() == Some(n.peer_id.as_str());
                    if ui.selectable_label(selected, &n.short).on_hover_text(&n.peer_id).clicked() {
                        clicked_row = Some(n.peer_id.clone());
                    }
                });
                row.col(|ui| {
                    ui.colored_label(role_color(n.role), role_label(n));
                });
                row.col(|ui| {
                    ui.label(&n.adapter);
                });
                row.col(|ui| {
                    ui.label(&n.backend);
                });
                row.col(|ui| {
                    ui.label(n.memory_bytes.map_or("–".into(), bytes));
                });
                row.col(|ui| {
                    ui.label(super::speed(n.gflops));
                });
                row.col(|ui| {
                    ui.label(super::speed(n.gbps));
                });
                row.col(|ui| {
                    ui.label(n.models.join(", "));
                });
                row.col(|ui| {
                    ui.label(n.running.to_string());
                });
                row.col(|ui| {
                    ui.label(n.waiting.to_string());
                });
                row.col(|ui| {
                    if n.kv_blocks_total > 0 {
                        let used = n.kv_used();
                        let fill = if used > 0.9 { Color32::from_rgb(230, 90, 70) } else { Color32::from_rgb(200, 170, 60) };
                        ui.add(ProgressBar::new(used).fill(fill).text(format!("{:.0}%", used * 100.0)).desired_height(14.0));
                    } else {
                        ui.label("–");
                    }
                });
                row.col(|ui| {
                    ui.label(format!("{:.1}", n.tokens_per_s));
                });
                row.col(|ui| {
                    ui.label(n.ttft_p50_ms.map_or("–".into(), |v| format!("{v:.0} ms")));
                });
            });
        });
    if let Some(k) = clicked_sort {
        s.sort_by(k);
    }
    if let Some(p) = clicked_row {
        s.selected = if s.selected.as_ref() == Some(&p) { None } else { Some(p) };
    }
}
