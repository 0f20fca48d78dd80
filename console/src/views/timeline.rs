//! The request timeline: the last requests as rows of a Gantt chart, each from its arrival at the
//! decode node: waiting (grey), the prompt's compute (orange, on the prefill node when split), the
//! K/V stream (green, drawn over the compute, so the overlap shows), and decoding (blue).

use egui::{Align2, Color32, FontId, Rect, Sense, Stroke, Ui, pos2, vec2};
use tandem_mesh::short;

use crate::state::Trace;

const ROWS: usize = 40;
const QUEUE: Color32 = Color32::from_rgb(120, 120, 120);
const PREFILL: Color32 = Color32::from_rgb(235, 150, 50);
const DECODE: Color32 = Color32::from_rgb(80, 150, 235);

pub fn timeline<'a>(ui: &mut Ui, traces: impl Iterator<Item = &'a Trace>) {
    let mut shown: Vec<&Trace> = traces.collect();
    shown.sort_by_key(|t| std::cmp::Reverse(t.trace.arrived_ms + t.trace.decode[1] as u64));
    shown.truncate(ROWS);
    ui.horizontal(|ui| {
        ui.label(format!("Last {} requests, newest first; each row from its arrival.", shown.len()));
        for (c, name) in [(QUEUE, "queue"), (PREFILL, "prefill"), (super::graph::FLOW_COLOR, "K/V transfer"), (DECODE, "decode")] {
            super::swatch(ui, c, name);
        }
    });
    if shown.is_empty() {
        ui.weak("No finished requests yet.");
        return;
    }
    let span = shown.iter().map(|t| t.trace.decode[1]).fold(1.0, f64::max);
    egui::ScrollArea::vertical().auto_shrink(false).show(ui, |ui| {
        let row_h = 18.0;
        let label_w = 250.0;
        let (resp, painter) = ui.allocate_painter(vec2(ui.available_width(), row_h * shown.len() as f32 + 20.0), Sense::hover());
        let area =
            Rect::from_min_max(pos2(resp.rect.min.x + label_w, resp.rect.min.y), pos2(resp.rect.max.x - 10.0, resp.rect.max.y - 20.0));
        let x = |ms: f64| area.min.x + (ms / span) as f32 * area.width();
        let text = ui.visuals().text_color();
        for (i, t) in shown.iter().enumerate() {
            let y = area.min.y + i as f32 * row_h;
            let tr = &t.trace;
            let who = match &tr.prefill_peer {
                Some(p) => format!("{} -> {}", short(p), short(&t.node)),
                None => short(&t.node).to_string(),
            };
            painter.text(
                pos2(resp.rect.min.x + 4.0, y + row_h / 2.0),
                Align2::LEFT_CENTER,
                format!("{who} · {} -> {} tok · {}", tr.prompt_tokens, tr.output_tokens, tr.outcome),
                FontId::proportional(11.0),
                text,
            );
            let bar = |a: f64, b: f64, top: f32, h: f32, c: Color32| {
                let r = Rect::from_min_max(pos2(x(a), y + top), pos2(x(b).max(x(a) + 1.0), y + top + h));
                painter.rect_filled(r, 2.0, c);
            };
            bar(0.0, tr.queue_ms, 4.0, row_h - 8.0, QUEUE);
            bar(tr.prefill[0], tr.prefill[1], 2.0, row_h - 4.0, PREFILL);
            if let Some([a, b]) = tr.kv {
                bar(a, b, row_h / 2.0 - 2.0, 4.0, super::graph::FLOW_COLOR);
            }
            bar(tr.decode[0], tr.decode[1], 2.0, row_h - 4.0, DECODE);
        }
        // The time axis.
        let base = area.max.y + 2.0;
        painter.line_segment([pos2(area.min.x, base), pos2(area.max.x, base)], Stroke::new(1.0, ui.visuals().weak_text_color()));
        for k in 0..=4 {
            let ms = span * k as f64 / 4.0;
            let align = match k {
                0 => Align2::LEFT_TOP,
                4 => Align2::RIGHT_TOP,
                _ => Align2::CENTER_TOP,
            };
            painter.text(pos2(x(ms), base + 2.0), align, super::duration(ms), FontId::proportional(10.0), ui.visuals().weak_text_color());
        }
    });
}
