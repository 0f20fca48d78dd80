//! Running a request somewhere in the mesh: `dispatch` takes the plans in order and runs each
//! attempt here (the local worker) or on a peer (`forward`, over `/tandem/infer/1`), relays its
//! pieces to the client, and when a node is lost or moves the request continues on another from
//! what the client has.

use std::collections::VecDeque;
use std::sync::Arc;

use tandem_mesh::{
    FramedStream, INFER_LIMITS, INFER_PROTOCOL, InferReply, InferRequest, InferResume, MeshEventKind, PROTOCOL_VERSION, PeerId, Placement,
};
use tokio::sync::mpsc;

use super::App;
use super::error::ServeError;
use super::openai::{Endpoint, Usage, generation};
use super::placement::{RequestShape, plan};
use super::request::{ClientHas, Continue, Piece, drive};

/// Nodes tried for one request before giving up.
const MAX_ATTEMPTS: usize = 3;
/// Text one forwarded request may bring back (far beyond any context of tokens).
const MAX_FORWARDED_TEXT: usize = 16 << 20;
/// Times one request may continue on another node after its node failed or moved it.
const MAX_RESUMES: usize = 4;

/// How one node's attempt at a request ended, beyond the pieces it delivered.
enum Attempt {
    /// It ended with a result (done, failed, or moved elsewhere) in its pieces.
    Final,
    /// It was not taken: another node may take it.
    Retry(String),
    /// The node failed after taking it: continue elsewhere from the tokens so far.
    Lost(String),
}

/// One node's attempt at the request: here, or on a peer through a direct stream; its pieces go
/// to `tx`.
async fn attempt(
    app: Arc<App>,
    endpoint: Endpoint,
    body: serde_json::Value,
    model: String,
    cand: Placement,
    resume: Option<InferResume>,
    tx: mpsc::Sender<Piece>,
) -> Attempt {
    if cand.is_self {
        let cont = Continue { resume, prefill: cand.prefill.as_ref().filter(|p| !p.is_self).map(|p| p.peer) };
        match app.loaded().and_then(|l| generation(&l, endpoint, body).map(|g| (l, g))) {
            Ok((loaded, g)) => drive(loaded, app.clone(), g, tx, cont).await,
            Err(e) => {
                let _ = tx.send(Piece::Failed(e)).await;
            }
        }
        return Attempt::Final;
    }
    let req = InferRequest {
        v: PROTOCOL_VERSION,
        endpoint: endpoint.into(),
        model,
        fingerprint: cand.fingerprint.clone(),
        body,
        resume,
        prefill: cand.prefill.as_ref().map(|p| p.peer.to_string()),
    };
    forward(&app, &cand, &req, &tx).await
}

/// Runs the request on the first plan that takes it, and keeps it going: when its node fails
/// mid-generation (or moves it while draining) it continues on another node from the tokens the
/// client has, so the client's stream has no gap and no repeat. Pieces of output go to `out`.
pub async fn dispatch(
    app: Arc<App>,
    endpoint: Endpoint,
    body: serde_json::Value,
    shape: RequestShape,
    candidates: Vec<Placement>,
    out: mpsc::Sender<Piece>,
) {
    let mut candidates: VecDeque<Placement> = candidates.into();
    let mut client = ClientHas::default();
    let mut exclude: Vec<PeerId> = Vec::new();
    let (mut tries, mut resumes) = (0, 0);
    let mut moved_to: Option<(PeerId, u64)> = None;
    let mut last = String::from("no node serves it");
    let mut fingerprint = candidates.front().map(|c| c.fingerprint.clone()).unwrap_or_default();
    loop {
        if out.is_closed() {
            return;
        }
        let mut parked = None;
        let cand = match moved_to.take() {
            Some((peer, ticket)) => {
                parked = Some(ticket);
                let is_self = peer == app.mesh.handle.peer_id();
                Some(Placement {
                    peer,
                    is_self,
                    fingerprint: fingerprint.clone(),
                    prefill: None,
                    expected_ttft_s: 0.0,
                    expected_tpot_s: 0.0,
                })
            }
            None if tries == 0 && resumes == 0 => candidates.pop_front(),
            None => plan(&app, &shape, &exclude).into_iter().next(),
        };
        let Some(cand) = cand else { break };
        if cand.is_self && cand.prefill.is_none() && client.tokens() == 0 {
            // A full local queue would answer 429; another node may still have room.
            let full = app.loaded().is_ok_and(|l| l.worker.stats().waiting >= l.worker.limits().max_waiting);
            if full && !plan(&app, &shape, &[app.mesh.handle.peer_id()]).is_empty() && tries + 1 < MAX_ATTEMPTS {
                last = "this node's queue is full".into();
                exclude.push(cand.peer);
                tries += 1;
                continue;
            }
        }
        fingerprint = cand.fingerprint.clone();
        let resume = client.resume(parked);
        let (tx, mut rx) = mpsc::channel(64);
        let task = tokio::spawn(attempt(app.clone(), endpoint, body.clone(), shape.model.clone(), cand.clone(), resume, tx));
        let mut moved = None;
        loop {
            let piece = tokio::select! {
                p = rx.recv() => p,
                () = out.closed() => {
                    // The client left: dropping the attempt cancels it here or on its node.
                    task.abort();
                    return;
                }
            };
            let Some(piece) = piece else { break };
            match piece {
                Piece::Token(id) => client.token(id),
                Piece::Text(t) => {
                    client.text(&t);
                    if out.send(Piece::Text(t)).await.is_err() {
                        return;
                    }
                }
                Piece::Done { finish, usage } => {
                    app.mesh.remember(shape.affinity_key, cand.peer);
                    app.mesh.observe_length(&app, &shape.model, shape.prompt_tokens, shape.budget(), usage.completion_tokens);
                    let _ = out.send(Piece::Done { finish, usage }).await;
                    return;
                }
                Piece::Failed(e) => {
                    let _ = out.send(Piece::Failed(e)).await;
                    return;
                }
                Piece::Moved { peer, ticket } => moved = Some((peer, ticket)),
            }
        }
        let outcome = task.await.unwrap_or_else(|e| Attempt::Lost(format!("the attempt failed: {e}")));
        if let Some((peer, ticket)) = moved {
            resumes += 1;
            let why = format!("node {} is draining: request moved to {}", cand.peer, peer.map_or("any node".into(), |p| p.to_string()));
            tracing::info!(reason = %why, tokens = client.tokens(), "continuing a moved request");
            app.mesh.handle.update_view(|v| v.record(MeshEventKind::Rerouted, cand.peer, why.clone()));
            moved_to = peer.zip(ticket);
            exclude.push(cand.peer);
            last = why;
        } else {
            match outcome {
                Attempt::Final => {
                    let _ = out.send(Piece::Failed(ServeError::PeerNoResult(cand.peer))).await;
                    return;
                }
                Attempt::Retry(why) => {
                    tries += 1;
                    tracing::warn!(peer = %cand.peer, reason = %why, "request not taken: trying the next node");
                    app.mesh.handle.update_view(|v| v.record(MeshEventKind::Rerouted, cand.peer, why.clone()));
                    exclude.push(cand.peer);
                    last = why;
                }
                Attempt::Lost(why) => {
                    resumes += 1;
                    tracing::warn!(peer = %cand.peer, reason = %why, tokens = client.tokens(), "node lost mid-request: continuing elsewhere");
                    app.mesh.handle.update_view(|v| {
                        v.record(MeshEventKind::Rerouted, cand.peer, format!("lost mid-request, resumed elsewhere: {why}"))
                    });
                    exclude.push(cand.peer);
                    last = why;
                }
            }
        }
        if tries >= MAX_ATTEMPTS || resumes > MAX_RESUMES {
            break;
        }
    }
    let _ = out.send(Piece::Failed(ServeError::NoNode(last))).await;
}

async fn forward(app: &App, cand: &Placement, req: &InferRequest, out: &mpsc::Sender<Piece>) -> Attempt {
    let peer = cand.peer;
    let stream = match app.mesh.handle.open_stream(peer, INFER_PROTOCOL).await {
        Ok(s) => s,
        Err(e) => return Attempt::Retry(e.to_string()),
    };
    let mut s = FramedStream::new(stream, INFER_LIMITS);
    if let Err(e) = async {
        s.send_msg(req).await?;
        s.finish().await
    }
    .await
    {
        return Attempt::Retry(format!("sending the request: {e}"));
    }
    match s.recv_msg::<InferReply>().await {
        Ok(Some(InferReply::Accepted { fingerprint })) if fingerprint == cand.fingerprint => {}
        Ok(Some(InferReply::Accepted { fingerprint })) => {
            let why = format!("advertised fingerprint {} but serves {fingerprint}", cand.fingerprint);
            app.mesh.handle.update_view(|v| v.distrust(peer, &req.model, &why));
            return Attempt::Retry(why);
        }
        Ok(Some(InferReply::Failed { status, message, code, .. }))
            if matches!(code.as_deref(), Some("fingerprint_mismatch" | "model_not_found")) =>
        {
            let why = format!("{status}: {message}");
            app.mesh.handle.update_view(|v| v.distrust(peer, &req.model, &why));
            return Attempt::Retry(why);
        }
        Ok(Some(InferReply::Failed { status, message, .. })) if status == 429 || status == 503 => {
            return Attempt::Retry(format!("{status}: {message}"));
        }
        Ok(Some(InferReply::Failed { status, message, code, param })) => {
            let _ = out.send(Piece::Failed(ServeError::Peer { status, message, code, param })).await;
            return Attempt::Final;
        }
        Ok(other) => return Attempt::Retry(format!("unexpected first reply {other:?}")),
        Err(e) => return Attempt::Retry(e.to_string()),
    }
    app.metrics.forwarded();
    let mut sent_text = 0usize;
    let mut result: Option<Piece> = None;
    loop {
        let reply = tokio::select! {
            r = s.recv_msg::<InferReply>() => r,
            // The client left: dropping the stream resets it, and the serving node cancels.
            () = out.closed() => return Attempt::Final,
        };
        let piece = match reply {
            Ok(Some(InferReply::Text { text })) if result.is_none() => {
                sent_text += text.len();
                if sent_text > MAX_FORWARDED_TEXT {
                    let _ = out.send(Piece::Failed(ServeError::PeerTooMuchText { peer, limit: MAX_FORWARDED_TEXT })).await;
                    return Attempt::Final;
                }
                Piece::Text(text)
            }
            Ok(Some(InferReply::Tokens { ids })) if result.is_none() => {
                for id in ids {
                    if out.send(Piece::Token(id)).await.is_err() {
                        return Attempt::Final;
                    }
                }
                continue;
            }
            Ok(Some(InferReply::Heartbeat)) => continue,
            Ok(Some(InferReply::Done { finish_reason, prompt_tokens, completion_tokens })) if result.is_none() => {
                let (p, c) = (prompt_tokens as usize, completion_tokens as usize);
                result = Some(Piece::Done {
                    finish: finish_reason,
                    usage: Usage { prompt_tokens: p, completion_tokens: c, total_tokens: p.saturating_add(c) },
                });
                continue;
            }
            Ok(Some(InferReply::Failed { status, message, code, param })) if result.is_none() => {
                result = Some(Piece::Failed(ServeError::Peer { status, message, code, param }));
                continue;
            }
            Ok(Some(InferReply::Moved { peer: to, ticket })) if result.is_none() => {
                let to = to.and_then(|p| p.parse::<PeerId>().ok());
                result = Some(Piece::Moved { peer: to, ticket: to.and(ticket) });
                continue;
            }
            // Only a verified trailer makes the result count.
            Ok(None) => {
                let Some(piece) = result else { return Attempt::Lost(format!("node {peer} ended the stream without a result")) };
                let _ = out.send(piece).await;
                return Attempt::Final;
            }
            Ok(Some(other)) => {
                let _ = out.send(Piece::Failed(ServeError::PeerProtocol { peer, reply: format!("{other:?}") })).await;
                return Attempt::Final;
            }
            Err(e) => return Attempt::Lost(format!("node {peer} failed mid-request: {e}")),
        };
        if out.send(piece).await.is_err() {
            // The client left; dropping the stream resets it, and the serving node cancels.
            return Attempt::Final;
        }
    }
}
