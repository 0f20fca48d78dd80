//! Serving the requests other nodes send over `/tandem/infer/1`: the same checks as the HTTP API,
//! then the local worker, whose pieces go back as replies (with heartbeats while there is nothing
//! else to say).

use std::sync::Arc;

use tandem_mesh::{FramedStream, HEARTBEAT, INFER_LIMITS, INFER_PROTOCOL, InferReply, InferRequest, PROTOCOL_VERSION, PeerId};
use tokio::sync::mpsc;

use super::App;
use super::api::failure_reply;
use super::error::ServeError;
use super::node_mesh::accept_streams;
use super::openai::generation;
use super::request::{Continue, MAX_FORWARDED_TOKENS, Piece, drive};

/// Takes the request streams other nodes open to this one.
pub async fn accept_loop(app: Arc<App>) {
    accept_streams(app, INFER_PROTOCOL, |app, peer, stream| async move { serve_stream(&app, peer, stream).await }).await;
}

async fn serve_stream(app: &Arc<App>, peer: PeerId, stream: tandem_mesh::Stream) {
    let _busy = app.mesh.busy_guard();
    let mut s = FramedStream::new(stream, INFER_LIMITS);
    let req = match s.recv_msg::<InferRequest>().await {
        Ok(Some(r)) => r,
        Ok(None) => return,
        Err(e) => {
            tracing::warn!(%peer, error = %e, "bad request stream");
            return;
        }
    };
    if let Err(e) =
        s.recv().await.and_then(|f| f.map_or(Ok(()), |_| Err(tandem_mesh::FrameError::Malformed("a second request frame".into()))))
    {
        tracing::warn!(%peer, error = %e, "request stream without a proper end");
        return;
    }
    let checked = (|| {
        if req.v != PROTOCOL_VERSION {
            return Err(ServeError::Version(req.v));
        }
        let loaded = app.loaded()?;
        if req.model != loaded.model_id {
            return Err(ServeError::NotServed(loaded.model_id.clone()));
        }
        if req.fingerprint != loaded.fingerprint {
            return Err(ServeError::Fingerprint { expected: req.fingerprint, have: loaded.fingerprint.clone() });
        }
        if app.mesh.draining() || !app.mesh.role().serves() {
            return Err(ServeError::NotTaking);
        }
        let prefill = match req.prefill.as_deref().map(str::parse::<PeerId>) {
            None => None,
            Some(Ok(p)) => Some(p),
            Some(Err(e)) => return Err(ServeError::PrefillPeer(e)),
        };
        if req.resume.as_ref().is_some_and(|r| r.tokens.len() > MAX_FORWARDED_TOKENS) {
            return Err(ServeError::TooManyResumed);
        }
        let g = generation(&loaded, req.endpoint.into(), req.body)?;
        Ok((loaded, g, Continue { resume: req.resume, prefill }))
    })();
    let (loaded, g, cont) = match checked {
        Ok(x) => x,
        Err(e) => {
            let _ = s.send_msg(&failure_reply(e)).await;
            let _ = s.finish().await;
            return;
        }
    };
    tracing::debug!(%peer, model = %loaded.model_id, "serving a request for a peer");
    app.metrics.served_for_peer();
    if s.send_msg(&InferReply::Accepted { fingerprint: loaded.fingerprint.clone() }).await.is_err() {
        return;
    }
    let (tx, mut rx) = mpsc::channel(64);
    tokio::spawn(drive(loaded, app.clone(), g, tx, cont));
    loop {
        let reply = match tokio::time::timeout(HEARTBEAT, rx.recv()).await {
            Err(_) => InferReply::Heartbeat,
            Ok(None) => break,
            Ok(Some(piece)) => reply(piece),
        };
        let last = matches!(reply, InferReply::Done { .. } | InferReply::Failed { .. } | InferReply::Moved { .. });
        if let Err(e) = s.send_msg(&reply).await {
            // The entry node is gone: dropping `rx` cancels the request.
            tracing::info!(%peer, error = %e, "the entry node went away: cancelling");
            return;
        }
        if last {
            break;
        }
    }
    let _ = s.finish().await;
}

/// A piece of output as the reply that carries it to the entry node.
fn reply(piece: Piece) -> InferReply {
    match piece {
        Piece::Text(text) => InferReply::Text { text },
        Piece::Token(id) => InferReply::Tokens { ids: vec![id] },
        Piece::Moved { peer, ticket } => InferReply::Moved { peer: peer.map(|p| p.to_string()), ticket },
        Piece::Done { finish, usage } => InferReply::Done {
            finish_reason: finish,
            prompt_tokens: usage.prompt_tokens as u64,
            completion_tokens: usage.completion_tokens as u64,
        },
        Piece::Failed(e) => failure_reply(e),
    }
}
