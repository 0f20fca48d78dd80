//! The cluster at a glance: prefill nodes on the left, decode nodes on the right, nodes that do
//! both between them, observers along the bottom; K/V streams run left to right as moving dashes
//! whose speed and width follow their live rate. Each role's column grows into more sub-columns
//! as nodes join, so 200 nodes stay apart.

use std::collections::HashMap;
use std::time::Duration;

use egui::{Align2, Color32, FontId, Pos2, Rect, Sense, Shape, Stroke, Ui, Vec2, pos2, vec2};
use tandem_mesh::Role;

use super::{bytes_per_s, role_color};
use crate::state::{ClusterState, NodeRow};

/// Mesh links are drawn only up to this many nodes (beyond, they are a grey fog).
const MAX_NODES_WITH_LINKS: usize = 40;
/// Node labels are drawn only up to this many nodes (beyond, hover for them).
const MAX_NODES_WITH_LABELS: usize = 60;
pub const FLOW_COLOR: Color32 = Color32::from_rgb(70, 220, 150);
/// The residual stream between the stages of a chain.
pub const HIDDEN_COLOR: Color32 = Color32::from_rgb(240, 170, 60);

/// The colour a flow of this kind is drawn in.
pub fn flow_color(kind: crate::state::FlowKind) -> Color32 {
    match kind {
        crate::state::FlowKind::Kv => FLOW_COLOR,
        crate::state::FlowKind::Hidden => HIDDEN_COLOR,
    }
}

/// Where each node goes in `rect`, and the largest radius that keeps them apart.
pub fn layout(nodes: &[&NodeRow], rect: Rect) -> (HashMap<String, Pos2>, f32) {
    let bottom_h = (rect.height() * 0.18).min(90.0);
    let main = Rect::from_min_max(rect.min + vec2(0.0, 28.0), pos2(rect.max.x, rect.max.y - bottom_h));
    let bands: [(&[Option<Role>], f32); 3] =
        [(&[Some(Role::Prefill)], 0.17), (&[Some(Role::Both), Some(Role::Auto)], 0.5), (&[Some(Role::Decode)], 0.83)];
    let mut pos = HashMap::new();
    let mut radius = 24.0f32;
    let mut groups: Vec<(Vec<&NodeRow>, Rect)> = Vec::new();
    let band_w = rect.width() / 3.0;
    for (roles, x) in bands {
        let members: Vec<&NodeRow> = nodes.iter().copied().filter(|n| roles.contains(&n.role)).collect();
        let cx = rect.min.x + rect.width() * x;
        groups.push((members, Rect::from_center_size(pos2(cx, main.center().y), vec2(band_w * 0.8, main.height()))));
    }
    let rest: Vec<&NodeRow> = nodes.iter().copied().filter(|n| matches!(n.role, Some(Role::Observer) | None)).collect();
    let bottom = Rect::from_min_max(pos2(rect.min.x + 20.0, rect.max.y - bottom_h), pos2(rect.max.x - 20.0, rect.max.y - 26.0));
    // Observers: one row (or more) along the bottom.
    groups.push((rest, bottom));
    for (members, area) in &groups {
        if members.is_empty() {
            continue;
        }
        let n = members.len();
        // The most square-ish grid with cells no wider than tall.
        let cols = ((n as f32 * area.width() / area.height().max(1.0)).sqrt().ceil() as usize).clamp(1, n);
        let rows = n.div_ceil(cols);
        let cell = vec2(area.width() / cols as f32, area.height() / rows as f32);
        radius = radius.min(cell.x.min(cell.y) * 0.38);
        for (i, m) in members.iter().enumerate() {
            let (c, r) = (i / rows, i % rows);
            // Centre a short last column.
            let in_col = if c + 1 == cols { n - c * rows } else { rows };
            let y0 = area.center().y - in_col as f32 * cell.y / 2.0;
            let x0 = area.center().x - cols as f32 * cell.x / 2.0;
            pos.insert(m.peer_id.clone(), pos2(x0 + (c as f32 + 0.5) * cell.x, y0 + (r as f32 + 0.5) * cell.y));
        }
    }
    (pos, radius.max(2.5))
}

/// Draws the graph; a click on a node selects it.
pub fn graph(ui: &mut Ui, s: &mut ClusterState) {
    let (resp, painter) = ui.allocate_painter(ui.available_size(), Sense::click());
    let rect = resp.rect;
    let visuals = ui.visuals().clone();
    painter.rect_filled(rect, 6.0, visuals.extreme_bg_color);
    let nodes: Vec<&NodeRow> = s.nodes.values().collect();
    let (pos, r_max) = layout(&nodes, rect);
    let max_gflops = nodes.iter().map(|n| n.gflops).fold(0.0, f64::max);
    let radius = |n: &NodeRow| {
        // Sized by compute: the area follows GFLOP/s, within a readable range.
        let share = if max_gflops > 0.0 { (n.gflops / max_gflops).sqrt() as f32 } else { 0.6 };
        r_max * (0.45 + 0.55 * share)
    };
    let weak = visuals.weak_text_color();
    for (text, x) in [("PREFILL", 0.17), ("BOTH", 0.5), ("DECODE", 0.83)] {
        painter.text(pos2(rect.min.x + rect.width() * x, rect.min.y + 6.0), Align2::CENTER_TOP, text, FontId::proportional(12.0), weak);
    }
    if nodes.len() <= MAX_NODES_WITH_LINKS {
        for (a, b) in &s.links {
            if let (Some(pa), Some(pb)) = (pos.get(a), pos.get(b)) {
                painter.line_segment([*pa, *pb], Stroke::new(1.0, visuals.widgets.noninteractive.bg_stroke.color.gamma_multiply(0.6)));
            }
        }
    }
    let time = ui.input(|i| i.time) as f32;
    let max_rate = s.flows.iter().map(|f| f.bytes_per_s).fold(1.0, f64::max);
    for f in &s.flows {
        let (Some(&a), Some(&b)) = (pos.get(&f.from), pos.get(&f.to)) else { continue };
        let dir = (b - a).normalized();
        let (a, b) = (a + dir * r_max, b - dir * r_max);
        // A gentle arc, so a stream passes beside the nodes between its ends.
        let bend = a + (b - a) * 0.5 + vec2(dir.y, -dir.x) * (b - a).length() * 0.12;
        let path: Vec<Pos2> = (0..=24)
            .map(|i| {
                let t = i as f32 / 24.0;
                let u = 1.0 - t;
                pos2(u * u * a.x + 2.0 * u * t * bend.x + t * t * b.x, u * u * a.y + 2.0 * u * t * bend.y + t * t * b.y)
            })
            .collect();
        let width = 1.5 + 4.5 * (f.bytes_per_s / max_rate).sqrt() as f32;
        // Dashes move toward the decode node, faster for faster streams.
        let speed = 20.0 + 60.0 * (f.bytes_per_s / max_rate) as f32;
        let offset = (time * speed) % 16.0;
        let color = flow_color(f.kind);
        painter.extend(Shape::dashed_line_with_offset(&path, Stroke::new(width, color), &[10.0], &[6.0], 16.0 - offset));
        let end_dir = (path[24] - path[23]).normalized();
        painter.add(arrow_head(b, end_dir, width + 5.0, color));
        if s.flows.len() <= 12 {
            painter.text(
                path[12] - vec2(0.0, width + 2.0),
                Align2::CENTER_BOTTOM,
                bytes_per_s(f.bytes_per_s),
                FontId::proportional(12.0),
                color,
            );
        }
    }
    if !s.flows.is_empty() {
        ui.ctx().request_repaint_after(Duration::from_millis(16));
    }
    let hover = resp.hover_pos();
    let mut hovered = None;
    for n in &nodes {
        let Some(&p) = pos.get(&n.peer_id) else { continue };
        let r = radius(n);
        painter.circle_filled(p, r, role_color(n.role));
        if n.draining {
            painter.circle_stroke(p, r + 3.0, Stroke::new(2.0, Color32::from_rgb(230, 70, 60)));
        }
        if s.selected.as_deref() == Some(n.peer_id.as_str()) {
            painter.circle_stroke(p, r + 5.0, Stroke::new(2.0, visuals.strong_text_color()));
        }
        // The K/V cache's fill, as an arc around the node.
        if n.kv_blocks_total > 0 && r > 5.0 {
            let used = n.kv_used();
            let steps = 24;
            let pts: Vec<Pos2> = (0..=steps)
                .map(|i| {
                    let a = -std::f32::consts::FRAC_PI_2 + std::f32::consts::TAU * used * i as f32 / steps as f32;
                    p + vec2(a.cos(), a.sin()) * (r + 1.5)
                })
                .collect();
            painter.add(Shape::line(pts, Stroke::new(2.0, Color32::from_rgb(250, 210, 80))));
        }
        if nodes.len() <= MAX_NODES_WITH_LABELS {
            let label = if n.is_self { format!("{} (me)", n.short) } else { n.short.clone() };
            painter.text(p + vec2(0.0, r + 4.0), Align2::CENTER_TOP, label, FontId::proportional(11.0), visuals.text_color());
            if n.role != Some(Role::Observer) && r > 8.0 {
                painter.text(p, Align2::CENTER_CENTER, format!("{}", n.running), FontId::proportional(12.0), Color32::BLACK);
            }
        }
        if hover.is_some_and(|h| h.distance(p) <= r.max(4.0)) {
            hovered = Some(*n);
        }
    }
    legend(&painter, rect, &visuals);
    if let Some(n) = hovered {
        resp.clone().on_hover_ui_at_pointer(|ui| {
            ui.strong(&n.peer_id);
            ui.label(format!("{} · {} · {}", super::role_label(n), n.adapter, n.backend));
            ui.label(format!("{} GFLOP/s · {} GB/s", super::speed(n.gflops), super::speed(n.gbps)));
            ui.label(format!(
                "{} running · {} waiting · K/V {:.0}% · {:.1} tok/s",
                n.running,
                n.waiting,
                n.kv_used() * 100.0,
                n.tokens_per_s
            ));
        });
        if resp.clicked() {
            s.selected = Some(n.peer_id.clone());
        }
    }
}

fn arrow_head(tip: Pos2, dir: Vec2, size: f32, color: Color32) -> Shape {
    let normal = vec2(-dir.y, dir.x);
    Shape::convex_polygon(vec![tip, tip - dir * size + normal * size * 0.5, tip - dir * size - normal * size * 0.5], color, Stroke::NONE)
}

fn legend(painter: &egui::Painter, rect: Rect, visuals: &egui::Visuals) {
    let mut x = rect.min.x + 10.0;
    let y = rect.max.y - 10.0;
    let font = FontId::proportional(11.0);
    for (role, name) in
        [(Some(Role::Prefill), "prefill"), (Some(Role::Decode), "decode"), (Some(Role::Both), "both"), (Some(Role::Observer), "observer")]
    {
        painter.circle_filled(pos2(x + 5.0, y - 5.0), 5.0, role_color(role));
        let r = painter.text(pos2(x + 14.0, y), Align2::LEFT_BOTTOM, name, font.clone(), visuals.weak_text_color());
        x = r.max.x + 12.0;
    }
    painter.line_segment([pos2(x, y - 5.0), pos2(x + 22.0, y - 5.0)], Stroke::new(3.0, FLOW_COLOR));
    let r = painter.text(pos2(x + 26.0, y), Align2::LEFT_BOTTOM, "K/V stream", font.clone(), visuals.weak_text_color());
    x = r.max.x + 12.0;
    painter.circle_stroke(pos2(x + 5.0, y - 5.0), 5.0, Stroke::new(2.0, Color32::from_rgb(250, 210, 80)));
    let r = painter.text(pos2(x + 14.0, y), Align2::LEFT_BOTTOM, "K/V cache used", font.clone(), visuals.weak_text_color());
    x = r.max.x + 12.0;
    painter.circle_stroke(pos2(x + 5.0, y - 5.0), 5.0, Stroke::new(2.0, Color32::from_rgb(230, 70, 60)));
    painter.text(pos2(x + 14.0, y), Align2::LEFT_BOTTOM, "draining · size = GFLOP/s", font, visuals.weak_text_color());
}
