//! The eframe app: drains the feed into the state each frame, draws the views, hands confirmed
//! orders to the feed.

use std::time::{Duration, Instant};

use crate::screenshot::Screenshot;
use crate::source::{Feed, Update};
use crate::state::ClusterState;

pub struct ConsoleApp {
    pub state: ClusterState,
    feed: Feed,
    started: Instant,
    screenshot: Option<(Screenshot, usize)>,
    /// Wait for a K/V stream before the screenshot.
    pub shot_streaming: bool,
}

impl ConsoleApp {
    /// `screenshot`: save a frame there once this many nodes are known, then close.
    pub fn new(state: ClusterState, feed: Feed, screenshot: Option<(Screenshot, usize)>) -> Self {
        ConsoleApp { state, feed, started: Instant::now(), screenshot, shot_streaming: false }
    }
}

impl eframe::App for ConsoleApp {
    // Panel sizes from another run (or another window size) are not worth keeping.
    fn persist_egui_memory(&self) -> bool {
        false
    }

    fn ui(&mut self, ui: &mut egui::Ui, _frame: &mut eframe::Frame) {
        let now = self.started.elapsed().as_secs_f64();
        while let Ok(update) = self.feed.updates.try_recv() {
            match update {
                Update::Snapshot(s) => self.state.apply(&s, now),
                Update::Reply(order, result) => self.state.reply(&order, &result),
                Update::Status(s) => self.state.tell(s),
            }
        }
        crate::views::console(ui, &mut self.state);
        for order in self.state.outbox.drain(..) {
            self.feed.send(order);
        }
        if let Some((shot, nodes)) = &mut self.screenshot {
            let ready = self.state.nodes.values().filter(|n| n.role.is_some()).count() >= *nodes
                && (!self.shot_streaming || !self.state.flows.is_empty());
            shot.tick(ui.ctx(), ready);
        }
        // Snapshots wake the UI; this keeps the clock-driven parts moving without them.
        ui.ctx().request_repaint_after(Duration::from_secs(1));
    }
}
