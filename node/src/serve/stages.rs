//! Serving stages of other nodes' chains over `/tandem/hidden/1`: a driver opens a session on
//! this node's span of layers, then sends one step at a time (token ids, and the hidden states
//! entering the span), and gets the hidden states leaving it, or at the last stage the sampled
//! token. The session's blocks are reserved at open and freed when the stream ends, however it
//! ends.
//!
//! A prefill stage of a split chain (`HiddenOpen::handoff`) also hands each step's K/V of its
//! span to the decode stage of the same span (`kv::hand_off`), behind the step's answer so the
//! pipeline does not wait for it; when the driver ends its steps, it answers `HandedOff` once
//! the decode stage holds them all.

use std::sync::Arc;

use tandem_core::SamplingParams;
use tandem_core::stage::{StageOut, StageStep};
use tandem_core::worker::WorkerHandle;
use tandem_mesh::{
    DTYPE_F16, DTYPE_F32, FramedStream, HIDDEN_LIMITS, HIDDEN_PROTOCOL, HiddenOpen, HiddenOutput, HiddenReply, HiddenShape, HiddenStep,
    PROTOCOL_VERSION, PeerId, StageOut as WireOut,
};
use tokio::sync::oneshot;

use super::node_mesh::accept_streams;
use super::{App, Loaded};

/// Takes the stage streams other nodes open to this one.
pub async fn accept_loop(app: Arc<App>) {
    accept_streams(app, HIDDEN_PROTOCOL, |app, peer, stream| async move { serve_stage(&app, peer, stream).await }).await;
}

/// Why a stage session could not open or go on; its message goes back to the driver.
#[derive(Debug, thiserror::Error)]
pub enum StageError {
    #[error("protocol version {0}, this node speaks {PROTOCOL_VERSION}")]
    Version(u16),
    #[error("this node has no model ready: {0}")]
    NotReady(String),
    #[error("this node serves {have}, not {want}")]
    Model { want: String, have: String },
    #[error("model fingerprint {want} asked, this node has {have}")]
    Fingerprint { want: String, have: String },
    #[error("layers {want:?} asked, this node holds {have:?}")]
    Span { want: [u32; 2], have: [u32; 2] },
    #[error("wire dtype {0} (f32 = {DTYPE_F32}, f16 = {DTYPE_F16})")]
    Dtype(u8),
    #[error("this node is not taking work")]
    NotTaking,
    #[error("{0}")]
    Engine(#[from] tandem_core::Error),
    #[error("the GPU worker has stopped")]
    WorkerGone,
    #[error("malformed step: {0}")]
    Malformed(tandem_mesh::HiddenError),
    #[error("cannot encode the output: {0}")]
    Encode(tandem_mesh::HiddenError),
    #[error("hand-off to {0:?}: not a peer id")]
    HandoffPeer(String),
    #[error("handing K/V to the decode stage: {0}")]
    Handoff(super::kv::TransferError),
}

/// The layers a node holds, as on the wire.
pub fn held_span(loaded: &Loaded) -> [u32; 2] {
    loaded.span.unwrap_or([0, loaded.layers])
}

/// Frees a session's blocks when its stream ends, however it ends.
struct Session {
    worker: WorkerHandle,
    id: u64,
    app: Arc<App>,
}

impl Drop for Session {
    fn drop(&mut self) {
        self.worker.stage_close(self.id);
        self.app.metrics.chain.stage_sessions.dec();
    }
}

/// Opens a session on `worker` for up to `positions` positions.
pub async fn open_session(worker: &WorkerHandle, positions: usize) -> Result<u64, StageError> {
    let (tx, rx) = oneshot::channel();
    worker.stage_open(
        positions,
        Box::new(move |r| {
            let _ = tx.send(r);
        }),
    )?;
    Ok(rx.await.map_err(|_| StageError::WorkerGone)??)
}

/// Runs one step of a session on `worker`.
pub async fn step_session(worker: &WorkerHandle, session: u64, step: StageStep) -> Result<StageOut, StageError> {
    let (tx, rx) = oneshot::channel();
    worker.stage_step(
        session,
        step,
        Box::new(move |r| {
            let _ = tx.send(r);
        }),
    )?;
    Ok(rx.await.map_err(|_| StageError::WorkerGone)??)
}

fn check_open(app: &App, open: &HiddenOpen) -> Result<Arc<Loaded>, StageError> {
    if open.v != PROTOCOL_VERSION {
        return Err(StageError::Version(open.v));
    }
    let loaded = app.loaded().map_err(|e| StageError::NotReady(e.to_string()))?;
    if open.model != loaded.model_id {
        return Err(StageError::Model { want: open.model.clone(), have: loaded.model_id.clone() });
    }
    if open.fingerprint != loaded.fingerprint {
        return Err(StageError::Fingerprint { want: open.fingerprint.clone(), have: loaded.fingerprint.clone() });
    }
    if open.layers != held_span(&loaded) {
        return Err(StageError::Span { want: open.layers, have: held_span(&loaded) });
    }
    if open.wire_dtype != DTYPE_F32 && open.wire_dtype != DTYPE_F16 {
        return Err(StageError::Dtype(open.wire_dtype));
    }
    if let Some(h) = &open.handoff {
        h.peer.parse::<PeerId>().map_err(|_| StageError::HandoffPeer(h.peer.clone()))?;
    }
    if app.mesh.draining() || !app.mesh.role().serves() {
        return Err(StageError::NotTaking);
    }
    Ok(loaded)
}

async fn serve_stage(app: &Arc<App>, peer: PeerId, stream: tandem_mesh::Stream) {
    let _busy = app.mesh.busy_guard();
    let mut s = FramedStream::new(stream, HIDDEN_LIMITS);
    let open = match s.recv_msg::<HiddenOpen>().await {
        Ok(Some(o)) => o,
        Ok(None) => return,
        Err(e) => {
            tracing::warn!(%peer, error = %e, "bad stage stream");
            return;
        }
    };
    let opened = match check_open(app, &open) {
        Ok(loaded) => open_session(&loaded.worker, open.positions as usize).await.map(|id| (loaded, id)),
        Err(e) => Err(e),
    };
    let (loaded, session) = match opened {
        Ok((loaded, id)) => {
            app.metrics.chain.stage_sessions.inc();
            (loaded.clone(), Session { worker: loaded.worker.clone(), id, app: app.clone() })
        }
        Err(e) => {
            tracing::info!(%peer, error = %e, "stage session refused");
            let _ = s.send_msg(&HiddenReply::Failed { message: e.to_string() }).await;
            let _ = s.finish().await;
            return;
        }
    };
    // Width 0 where a direction carries no hidden states: steps into the first stage, and the
    // last stage's sampled tokens.
    let [start, end] = held_span(&loaded);
    let width = |carries: bool| if carries { loaded.hidden_size as u32 } else { 0 };
    let step_shape = HiddenShape { width: width(start > 0), dtype: open.wire_dtype };
    let out_shape = HiddenShape { width: width(end < loaded.layers), dtype: open.wire_dtype };
    let reply = HiddenReply::Opened {
        max_step_tokens: (loaded.max_step_tokens as u32)
            .min(tandem_mesh::max_frame_tokens(step_shape))
            .min(tandem_mesh::max_frame_tokens(out_shape)),
        hidden_size: loaded.hidden_size as u32,
        attention_budget: loaded.attention_budget as u32,
        session: session.id,
    };
    if s.send_msg(&reply).await.is_err() {
        return;
    }
    tracing::debug!(%peer, layers = ?open.layers, positions = open.positions, handoff = open.handoff.is_some(), "stage session opened");
    // The steps' position ranges, for the task handing their K/V on (bounded: a slow decode
    // stage holds the steps back rather than grow a queue).
    let (ranges, handoff) = match open.handoff.clone() {
        Some(h) => {
            let (tx, rx) = tokio::sync::mpsc::channel(4);
            let task = super::kv::hand_off(app.clone(), loaded.clone(), session.id, h, open.layers, open.positions, rx);
            (Some(tx), Some(tokio::spawn(task)))
        }
        None => (None, None),
    };
    loop {
        let frame = match s.recv().await {
            Ok(Some(f)) => f,
            Ok(None) => break,
            Err(e) => {
                tracing::info!(%peer, error = %e, "stage stream ended early: session closed");
                return;
            }
        };
        app.metrics.chain.hidden_received_bytes.inc_by(frame.len() as u64);
        app.mesh.count_hidden_bytes(peer, frame.len() as u64);
        let out = match HiddenStep::decode(&frame, step_shape) {
            Ok(step) => {
                let seq_no = step.seq_no;
                let core = StageStep {
                    start: step.start as usize,
                    tokens: step.tokens,
                    hidden: step.hidden,
                    sample: step.sample.map(|w| SamplingParams {
                        temperature: w.temperature,
                        top_k: w.top_k,
                        top_p: w.top_p,
                        seed: w.seed,
                    }),
                };
                let range = (core.start, core.start + core.tokens.len());
                step_session(&session.worker, session.id, core).await.map(|out| (seq_no, range, out))
            }
            Err(e) => Err(StageError::Malformed(e)),
        };
        let mut ran = None;
        let encoded = out.and_then(|(seq_no, range, out)| {
            ran = Some(range);
            let out = match out {
                StageOut::Hidden(h) => WireOut::Hidden(h),
                StageOut::Token(t) => WireOut::Tokens(vec![t]),
            };
            HiddenOutput { seq_no, out }.encode(out_shape).map_err(StageError::Encode)
        });
        let frame = match encoded {
            Ok(frame) => frame,
            Err(e) => {
                tracing::info!(%peer, error = %e, "stage step refused: session closed");
                let _ = s.send_msg(&HiddenReply::Failed { message: e.to_string() }).await;
                let _ = s.finish().await;
                return;
            }
        };
        app.metrics.chain.stage_steps.inc();
        app.metrics.chain.hidden_sent_bytes.inc_by(frame.len() as u64);
        if let Err(e) = s.send(&frame).await {
            tracing::info!(%peer, error = %e, "stage reply not taken: session closed");
            return;
        }
        if let (Some(tx), Some(range)) = (&ranges, ran)
            && tx.send(range).await.is_err()
        {
            // The hand-off failed; its error goes to the driver when the steps end.
            tracing::debug!(%peer, "the K/V hand-off ended early");
        }
    }
    if let Some(task) = handoff {
        drop(ranges);
        let reply = match task.await {
            Ok(Ok(positions)) => {
                app.metrics.chain.handed_off_sessions.inc();
                HiddenReply::HandedOff { positions }
            }
            Ok(Err(e)) => HiddenReply::Failed { message: StageError::Handoff(e).to_string() },
            Err(e) => HiddenReply::Failed { message: format!("the K/V hand-off task failed: {e}") },
        };
        // The decode stage holds the K/V now: this session's blocks are no longer needed.
        drop(session);
        let _ = s.send_msg(&reply).await;
    }
    let _ = s.finish().await;
}
