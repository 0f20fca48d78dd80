//! The node's role and draining: the once-a-second publication of its ad and load, which also
//! ticks the balancer of an `auto` node; role flips (drain, then switch); operators' role and
//! drain commands; and handing running requests to other decode nodes (live migration).

use std::sync::Arc;
use std::time::{Duration, Instant};

use tandem_mesh::{Role, RoleBalancer, RoleInput};

use super::App;
use super::error::ServeError;
use super::node_mesh::{capability, load_report, refresh_own};
use super::placement::decode_targets;

/// Hands this node's running requests to other decode nodes (live migration), if there are
/// any; otherwise they finish here. Returns whether they are being moved.
pub fn move_running(app: &App) -> bool {
    let Ok(loaded) = app.loaded() else { return false };
    if loaded.worker.stats().running + loaded.worker.stats().waiting == 0 || decode_targets(app, &loaded, 1).is_empty() {
        return false;
    }
    tracing::info!(running = loaded.worker.stats().running, "draining: moving running requests to other decode nodes");
    loaded.worker.detach_all().is_ok()
}

/// An operator's drain: stop taking requests and move the running ones away; or take requests
/// again.
pub async fn drain(app: &App, on: bool) -> bool {
    if !on {
        app.mesh.set_draining(false);
        let _ = app.mesh.handle.publish_load(load_report(app, false)).await;
        return false;
    }
    app.mesh.set_draining(true);
    let _ = app.mesh.handle.publish_load(load_report(app, false)).await;
    move_running(app)
}

/// Publishes the ad now and the load every second; ticks the role balancer of an auto node.
pub async fn publish_loop(app: Arc<App>) {
    let mut balancer = RoleBalancer::new(3, Duration::from_secs(30));
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut advertised = None;
    loop {
        tick.tick().await;
        let ad = capability(&app);
        // Re-advertise when something in the ad changed (model loaded, role flipped).
        if advertised.as_ref() != Some(&ad) {
            if app.mesh.handle.set_capability(ad.clone()).await.is_err() {
                return;
            }
            advertised = Some(ad);
        }
        if app.mesh.handle.publish_load(load_report(&app, true)).await.is_err() {
            return;
        }
        if app.mesh.setting() == Role::Auto && !app.mesh.draining() && app.loaded().is_ok() {
            let me = app.mesh.handle.peer_id().to_string();
            let inputs = role_inputs(&app);
            if let Some(target) = balancer.tick(&me, &inputs, app.mesh.role(), Instant::now()) {
                tracing::info!(from = %app.mesh.role(), to = %target, "auto role: flipping");
                let app = app.clone();
                tokio::spawn(async move { flip_role(&app, target).await });
            }
        }
    }
}

fn role_inputs(app: &App) -> Vec<RoleInput> {
    let snap = app.mesh.handle.snapshot();
    snap.nodes
        .iter()
        .filter_map(|n| {
            let role = n.role?;
            let load = n.load.clone().unwrap_or_default();
            let params = n.models.first().map_or(1, |m| m.parameters.max(1));
            let speed = n.speed.unwrap_or_default();
            Some(RoleInput {
                peer_id: n.peer_id.clone(),
                setting: if n.auto_role { Role::Auto } else { role },
                current: role,
                speed,
                queued_prefill_tokens: load.queued_prefill_tokens,
                running: load.running,
                waiting: load.waiting,
                kv_blocks_free: load.kv_blocks_free,
                kv_blocks_total: load.kv_blocks_total,
                prefill_tokens_per_s: tandem_mesh::prefill_tokens_per_s(speed.gflops, params),
            })
        })
        .collect()
}

/// Changes the role, after in-flight work has drained (for at most the shutdown grace).
pub async fn flip_role(app: &App, target: Role) {
    let _one_at_a_time = app.mesh.flipping().await;
    let from = app.mesh.role();
    let setting = app.mesh.setting();
    // A balancer flip that lost the race to an operator's pin, or any flip during shutdown.
    if from == target || (setting != Role::Auto && target != setting) || app.mesh.stopping() {
        return;
    }
    app.mesh.set_draining(true);
    let _ = app.mesh.handle.publish_load(load_report(app, false)).await;
    if !matches!(target, Role::Decode | Role::Both) {
        move_running(app);
    }
    let start = Instant::now();
    let grace = Duration::from_secs(app.cfg.shutdown_grace);
    while let Ok(l) = app.loaded() {
        let s = l.worker.stats();
        if s.running == 0 && s.waiting == 0 {
            break;
        }
        if start.elapsed() > grace {
            tracing::warn!(running = s.running, "role flip: grace period over with requests still running");
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    app.mesh.switch_role(target);
    app.mesh.set_draining(false);
    tracing::info!(%from, to = %target, drained_ms = start.elapsed().as_millis() as u64, "role changed");
    let _ = app.mesh.handle.set_capability(capability(app)).await;
    let _ = app.mesh.handle.publish_load(load_report(app, false)).await;
}

/// An operator's role command: pin a role, or hand the choice back to `auto`. The flip runs in
/// its own task, so a client that hangs up mid-drain cannot leave the node draining.
pub async fn set_role(app: &Arc<App>, setting: Role) -> Result<serde_json::Value, ServeError> {
    let task = app.clone();
    tokio::spawn(async move { set_role_now(&task, setting).await }).await.unwrap_or_else(|e| Err(ServeError::RoleChange(e)))
}

async fn set_role_now(app: &App, setting: Role) -> Result<serde_json::Value, ServeError> {
    if setting.serves() && app.loaded().is_err() {
        return Err(ServeError::NoModelForRole);
    }
    let previous = app.mesh.role();
    app.mesh.set_setting(setting);
    refresh_own(app);
    let target =
        if setting == Role::Auto { tandem_mesh::auto_role(&app.mesh.handle.peer_id().to_string(), &role_inputs(app), 0) } else { setting };
    let start = Instant::now();
    flip_role(app, target).await;
    let _ = app.mesh.handle.set_capability(capability(app)).await;
    Ok(
        serde_json::json!({ "role": app.mesh.role(), "setting": setting, "previous": previous, "drained_ms": start.elapsed().as_millis() as u64 }),
    )
}
