//! Operators' commands over the mesh (`/tandem/control/1`, sent by the console): pin this node's
//! role or drain it. Each command is checked against the mesh secret, this node's peer id, the
//! clock and the nonces already seen (`ControlGate`) before it runs; a node without a mesh secret
//! refuses them all.

use std::sync::{Arc, Mutex};

use tandem_mesh::{CONTROL_LIMITS, CONTROL_PROTOCOL, ControlCommand, ControlGate, ControlReply, ControlRequest, FramedStream, PeerId};

use super::App;

/// Takes the control streams other nodes (a console) open to this one.
pub async fn accept_loop(app: Arc<App>) {
    let me = app.mesh.handle.peer_id().to_string();
    let gate = Arc::new(Mutex::new(ControlGate::new(app.cfg.mesh.secret.as_ref(), &me)));
    super::node_mesh::accept_streams(app, CONTROL_PROTOCOL, move |app, peer, stream| {
        let gate = gate.clone();
        async move { serve_control(&app, &gate, peer, stream).await }
    })
    .await;
}

async fn serve_control(app: &Arc<App>, gate: &Mutex<ControlGate>, peer: PeerId, stream: tandem_mesh::Stream) {
    let mut s = FramedStream::new(stream, CONTROL_LIMITS);
    let req = match s.recv_msg::<ControlRequest>().await {
        Ok(Some(r)) => r,
        Ok(None) => return,
        Err(e) => {
            tracing::warn!(%peer, error = %e, "bad control stream");
            return;
        }
    };
    if let Err(e) = s.recv().await.and_then(|f| f.map_or(Ok(()), |_| Err(tandem_mesh::FrameError::Malformed("a second frame".into())))) {
        tracing::warn!(%peer, error = %e, "control stream without a proper end");
        return;
    }
    let checked = gate
        .lock()
        .map_err(|_| "control gate poisoned".to_string())
        .and_then(|mut g| g.check(&req, tandem_mesh::unix_ms()).map_err(|e| e.to_string()));
    let reply = match checked {
        Err(message) => {
            tracing::warn!(%peer, command = %req.command, %message, "control command refused");
            app.mesh
                .handle
                .update_view(|v| v.record(tandem_mesh::MeshEventKind::Refused, peer, format!("control `{}`: {message}", req.command)));
            ControlReply::Refused { message }
        }
        Ok(command) => {
            tracing::info!(%peer, %command, "control command");
            app.mesh.handle.update_view(|v| {
                v.record(
                    tandem_mesh::MeshEventKind::Control,
                    peer,
                    format!("{command} on {}", tandem_mesh::short(&app.mesh.handle.peer_id().to_string())),
                )
            });
            let result = match command {
                ControlCommand::SetRole { role } => super::roles::set_role(app, role).await.map(|_| ()).map_err(|e| e.to_string()),
                ControlCommand::Drain { drain } => {
                    super::roles::drain(app, drain).await;
                    Ok(())
                }
            };
            match result {
                Ok(()) => ControlReply::Done { role: app.mesh.role(), draining: app.mesh.draining() },
                Err(message) => ControlReply::Refused { message },
            }
        }
    };
    if s.send_msg(&reply).await.is_ok() {
        let _ = s.finish().await;
    }
}
