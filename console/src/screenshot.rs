//! Saving a frame of the running app as a PNG and closing it: how the README's screenshots are
//! made under Xvfb. The frame is read back from the app's own renderer, so it shows exactly what a
//! person would see.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A screenshot to take once the app is ready and `after` has passed.
#[derive(Debug)]
pub struct Screenshot {
    pub path: PathBuf,
    pub after: Duration,
    started: Instant,
    requested: bool,
}

impl Screenshot {
    pub fn new(path: PathBuf, after: Duration) -> Self {
        Screenshot { path, after, started: Instant::now(), requested: false }
    }

    /// Call every frame; asks for the screenshot once `ready` and the delay has passed. The app
    /// closes when the file is written.
    pub fn tick(&mut self, ctx: &egui::Context, ready: bool) {
        if self.requested {
            return;
        }
        let left = self.after.saturating_sub(self.started.elapsed());
        if !ready || !left.is_zero() {
            // Wake when it is due (readiness arrives with updates, which wake the app anyway).
            ctx.request_repaint_after(left.max(Duration::from_millis(500)));
            return;
        }
        self.requested = true;
        let (path, closer) = (self.path.clone(), ctx.clone());
        ctx.send_viewport_cmd(egui::ViewportCommand::Screenshot(egui::ScreenshotCallback::new(move |img: Arc<egui::ColorImage>| {
            let raw: Vec<u8> = img.pixels.iter().flat_map(|c| c.to_array()).collect();
            let saved = image::RgbaImage::from_raw(img.size[0] as u32, img.size[1] as u32, raw)
                .ok_or_else(|| "the frame has the wrong size".to_string())
                .and_then(|i| i.save(&path).map_err(|e| e.to_string()));
            match saved {
                Ok(()) => tracing::info!(path = %path.display(), "screenshot saved"),
                Err(e) => tracing::error!(path = %path.display(), error = %e, "screenshot failed"),
            }
            closer.send_viewport_cmd(egui::ViewportCommand::Close);
        })));
    }
}
