//! Live charts (egui_plot) over the last minutes: cluster throughput, TTFT and TPOT p50/p99 of
//! the requests finished in the last 30 s, SLO attainment, and the queue.

use egui::{Color32, Ui};
use egui_plot::{HLine, Legend, Line, Plot, PlotPoints};

use crate::state::{ClusterState, Sample};

/// Seconds the charts show.
const SHOWN_S: f64 = 300.0;
const P50: Color32 = Color32::from_rgb(90, 170, 250);
const P99: Color32 = Color32::from_rgb(250, 120, 90);

fn series(s: &ClusterState, f: impl Fn(&Sample) -> Option<f64>) -> PlotPoints<'static> {
    let now = s.history.back().map_or(0.0, |x| x.t);
    s.history.iter().filter(|x| now - x.t <= SHOWN_S).filter_map(|x| f(x).map(|y| [x.t - now, y])).collect::<Vec<_>>().into()
}

fn plot<'a>(id: &str, title: &str, height: f32) -> Plot<'a> {
    Plot::new(id)
        .height(height)
        .legend(Legend::default().position(egui_plot::Corner::LeftTop))
        .allow_drag(false)
        .allow_zoom(false)
        .allow_scroll(false)
        .allow_boxed_zoom(false)
        .include_x(-60.0)
        .include_x(0.0)
        .include_y(0.0)
        .y_axis_min_width(36.0)
        .y_axis_label(title.to_string())
        .x_axis_formatter(|m, _| format!("{:.0}s", m.value))
}

/// The four charts, stacked in `ui`.
pub fn charts(ui: &mut Ui, s: &ClusterState) {
    let h = ((ui.available_height() - 4.0 * ui.spacing().item_spacing.y) / 4.0).max(60.0);
    let last = s.history.back().copied().unwrap_or_default();
    ui.label(format!("Throughput · {:.1} tok/s", last.tokens_per_s));
    plot("throughput", "tok/s", h - 18.0).show(ui, |p| {
        p.line(Line::new("tokens/s", series(s, |x| Some(x.tokens_per_s))).color(Color32::from_rgb(120, 220, 120)).fill(0.0));
    });
    ui.label(format!("TTFT · p50 {} · p99 {}   (SLO {:.0} ms)", ms(last.ttft_p50_ms), ms(last.ttft_p99_ms), s.slo.ttft_ms));
    plot("ttft", "ms", h - 18.0).show(ui, |p| {
        p.line(Line::new("TTFT p50", series(s, |x| x.ttft_p50_ms)).color(P50));
        p.line(Line::new("TTFT p99", series(s, |x| x.ttft_p99_ms)).color(P99));
        p.hline(HLine::new("TTFT SLO", s.slo.ttft_ms).color(Color32::GRAY).style(egui_plot::LineStyle::dashed_dense()));
    });
    ui.label(format!("TPOT · p50 {} · p99 {}   (SLO {:.0} ms)", ms(last.tpot_p50_ms), ms(last.tpot_p99_ms), s.slo.tpot_ms));
    plot("tpot", "ms", h - 18.0).show(ui, |p| {
        p.line(Line::new("TPOT p50", series(s, |x| x.tpot_p50_ms)).color(P50));
        p.line(Line::new("TPOT p99", series(s, |x| x.tpot_p99_ms)).color(P99));
        p.hline(HLine::new("TPOT SLO", s.slo.tpot_ms).color(Color32::GRAY).style(egui_plot::LineStyle::dashed_dense()));
    });
    ui.label(format!(
        "SLO attainment {} · queue {} waiting, {} running",
        last.slo_attainment.map_or("–".into(), |a| format!("{:.0}%", a * 100.0)),
        last.waiting,
        last.running
    ));
    plot("slo", "", h - 18.0).include_y(100.0).show(ui, |p| {
        p.line(Line::new("SLO met %", series(s, |x| x.slo_attainment.map(|a| a * 100.0))).color(Color32::from_rgb(120, 220, 120)));
        p.line(Line::new("waiting", series(s, |x| Some(x.waiting as f64))).color(P99));
        p.line(Line::new("running", series(s, |x| Some(x.running as f64))).color(P50));
    });
}

fn ms(v: Option<f64>) -> String {
    v.map_or("–".into(), |v| if v >= 1000.0 { format!("{:.2} s", v / 1e3) } else { format!("{v:.0} ms") })
}
