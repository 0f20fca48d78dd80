//! K/V between nodes over `/tandem/kv/1` (see `tandem_mesh::kv` for the protocol):
//! - a decode node asks a prefill node to prefill a prompt and receives its K/V layer by layer
//!   into a parked sequence while the later layers are still computing (`prefill_remote`);
//! - a prefill node runs such a prefill, streaming each layer as the GPU writes it, with a
//!   bounded number of layers in flight (`serve_prefill`);
//! - a draining decode node moves a running request's K/V to another decode node
//!   (`migrate`), which parks it until the request arrives (`receive_park`);
//! - a prefill stage of a split chain hands its span's K/V, step by step, to the decode stage
//!   of the same span (`hand_off`), straight into that stage's session (`receive_stage`).
//!
//! Whatever goes wrong (a malformed, out-of-order, foreign or cut-off transfer; a peer that
//! vanishes), the parked sequence is freed at once: nothing of a failed transfer stays.

use std::sync::Arc;
use std::time::Instant;

use tandem_core::scheduler::{Event, KvExport, Request, Start};
use tandem_core::{KvDtype, KvLayer};
use tandem_mesh::{
    DTYPE_F16, DTYPE_F32, FrameError, FramedStream, KV_LIMITS, KV_PROTOCOL, KvChunk, KvError, KvOpen, KvProgress, KvReply, KvSampling,
    KvShape, MAX_CHUNK_TOKENS, MeshEventKind, PROTOCOL_VERSION, PeerId, Role, encode_chunk, fingerprint_number, hidden_share, is_chunk,
};
use tokio::sync::{mpsc, oneshot};

use super::error::ServeError;
use super::{App, Loaded};

/// Layers a prefill node may have computed but not yet sent: beyond this the GPU thread waits.
const LAYERS_IN_FLIGHT: usize = 8;

type Stream = FramedStream<tandem_mesh::Stream>;

/// Why a K/V transfer failed, on either side; the sender of a refusal puts its message in
/// `KvReply::Failed`. Whatever it is, the parked sequence is freed.
#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    /// This node's model fingerprint does not fit a chunk's header.
    #[error("fingerprint {0} is not 16 hex digits")]
    Fingerprint(String),
    /// No stream to the peer.
    #[error(transparent)]
    Open(tandem_mesh::Error),
    /// The stream failed: i/o, a stall, a frame over its bound, a bad or missing trailer.
    #[error(transparent)]
    Stream(#[from] FrameError),
    /// A chunk that does not belong to this transfer (foreign, misshapen, out of order,
    /// repeated), or a transfer that ended with positions missing.
    #[error(transparent)]
    Chunk(#[from] KvError),
    /// A reply that is not one.
    #[error("malformed reply: {0}")]
    MalformedReply(serde_json::Error),
    /// A reply out of turn, as the peer sent it.
    #[error("unexpected reply {0}")]
    UnexpectedReply(String),
    #[error("data after the first token")]
    AfterFirstToken,
    #[error("the stream ended without the first token")]
    NoFirstToken,
    #[error("a message where K/V was expected")]
    NotKv,
    #[error("first token {0} outside the vocabulary")]
    FirstTokenOutOfRange(u32),
    /// The prefill node refused or failed the prefill, with its message.
    #[error("the prefill node failed: {0}")]
    PrefillFailed(String),
    /// The decode node refused to park the K/V, with its message.
    #[error("{0}")]
    Refused(String),
    /// The local GPU worker refused a command.
    #[error(transparent)]
    Worker(tandem_core::Error),
    #[error("the GPU worker stopped")]
    WorkerStopped,
    #[error("no room for the K/V here: {0}")]
    NoRoom(tandem_core::Error),
    // What a node refuses to take from a peer (its message goes back in `KvReply::Failed`).
    /// This node has no model to take it (loading, stopping, an observer).
    #[error(transparent)]
    Unavailable(ServeError),
    #[error("protocol version {0}, this node speaks {PROTOCOL_VERSION}")]
    Version(u16),
    /// The transfer is for another model, or the same one with other weights.
    #[error("this node serves `{model}` with fingerprint {fingerprint}")]
    Mismatch { model: String, fingerprint: String },
    #[error("{tokens} tokens do not fit a context of {context}")]
    TooLong { tokens: usize, context: usize },
    #[error("token {0} outside the vocabulary")]
    TokenOutOfRange(u32),
    #[error("this node is draining")]
    Draining,
    /// Its role does not take this side of a transfer.
    #[error("this node's role is {0}")]
    Role(Role),
    #[error("skip {skip} leaves nothing of {tokens} tokens to prefill")]
    NothingToPrefill { skip: usize, tokens: usize },
    /// The scheduler refused or failed the prefill, with its reason.
    #[error("{0}")]
    Scheduler(String),
    #[error("the prefill produced no token")]
    NoToken,
    #[error("K/V of layers {want:?} offered, this node holds {have:?}")]
    Span { want: [u32; 2], have: [u32; 2] },
    #[error("the decode stage holds {held} of the {want} positions handed to it")]
    Short { held: usize, want: usize },
}

fn shape(loaded: &Loaded, session: u64) -> Result<KvShape, TransferError> {
    let fingerprint = fingerprint_number(&loaded.fingerprint).ok_or_else(|| TransferError::Fingerprint(loaded.fingerprint.clone()))?;
    Ok(KvShape { session, fingerprint, layers: loaded.layers, heads: loaded.kv_heads, head_dim: loaded.head_dim })
}

/// One layer's K/V as frames of at most `MAX_CHUNK_TOKENS` positions, in the cache's dtype (so
/// an f16 cache sends half the bytes, exactly).
fn chunks(kv: &KvLayer, shape: &KvShape, cache: KvDtype) -> impl Iterator<Item = Vec<u8>> {
    let dtype = match cache {
        KvDtype::F16 => DTYPE_F16,
        KvDtype::F32 => DTYPE_F32,
    };
    let dim = (shape.heads * shape.head_dim) as usize;
    (0..kv.tokens).step_by(MAX_CHUNK_TOKENS).map(move |from| {
        let rows = from * dim..(from + MAX_CHUNK_TOKENS.min(kv.tokens - from)) * dim;
        let start = (kv.start + from) as u32;
        encode_chunk(
            shape.session,
            shape.fingerprint,
            kv.layer as u32,
            start,
            shape.heads,
            shape.head_dim,
            dtype,
            &kv.k[rows.clone()],
            &kv.v[rows],
        )
    })
}

/// The part of a chunk at positions `from` and later, as a layer to import.
fn layer_from(c: KvChunk, from: usize) -> Option<KvLayer> {
    let (start, end) = (c.start as usize, (c.start + c.tokens) as usize);
    if end <= from {
        return None;
    }
    let skip = from.saturating_sub(start);
    let dim = (c.heads * c.head_dim) as usize;
    let (mut k, mut v) = (c.k, c.v);
    if skip > 0 {
        k.drain(..skip * dim);
        v.drain(..skip * dim);
    }
    Some(KvLayer { layer: c.layer as usize, start: start + skip, tokens: end - start - skip, k, v })
}

/// A parked sequence this node holds for a transfer or a request: freed when dropped, unless
/// handed on (to the scheduler with its request, or to the peer that will send the request).
pub struct Ticket {
    worker: tandem_core::worker::WorkerHandle,
    pub id: u64,
    kept: bool,
}

impl Ticket {
    /// The ticket is someone else's to use or let expire now.
    pub fn keep(mut self) -> u64 {
        self.kept = true;
        self.id
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if !self.kept {
            self.worker.discard(self.id);
        }
    }
}

/// A callback for a GPU worker's answer, and where the answer arrives.
fn answer<T: Send + 'static>() -> (Box<dyn FnOnce(T) + Send>, oneshot::Receiver<T>) {
    let (tx, rx) = oneshot::channel();
    (
        Box::new(move |r| {
            let _ = tx.send(r);
        }),
        rx,
    )
}

/// Checks that every position parked under `ticket` has arrived (imports are applied in order).
async fn seal(loaded: &Loaded, ticket: u64) -> Result<(), TransferError> {
    let (reply, rx) = answer();
    loaded.worker.seal(ticket, reply).map_err(TransferError::Worker)?;
    rx.await.map_err(|_| TransferError::WorkerStopped)?.map_err(TransferError::Worker)
}

async fn park(loaded: &Loaded, tokens: Vec<u32>) -> Result<(Ticket, usize), TransferError> {
    let (reply, rx) = answer();
    loaded.worker.park(tokens, reply).map_err(TransferError::Worker)?;
    let (id, held) = rx.await.map_err(|_| TransferError::WorkerStopped)?.map_err(TransferError::NoRoom)?;
    Ok((Ticket { worker: loaded.worker.clone(), id, kept: false }, held))
}

fn session_id() -> u64 {
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    xxhash_rust::xxh3::xxh3_64(&t.to_le_bytes()) ^ u64::from(std::process::id())
}

/// Receives one chunk from `peer`, checking it against the transfer, hands its positions from
/// `held` on to `import` (a parked sequence's, or a stage session's), and counts its bytes on
/// the link as they arrive (the console draws live streams from them).
fn receive_chunk(
    app: &App,
    peer: PeerId,
    frame: &[u8],
    shape: &KvShape,
    progress: &mut KvProgress,
    held: usize,
    import: impl FnOnce(KvLayer) -> tandem_core::Result<()>,
) -> Result<(), TransferError> {
    let chunk = KvChunk::decode(frame, shape)?;
    let before = progress.bytes;
    progress.accept(&chunk)?;
    app.mesh.count_link_bytes(peer, progress.bytes - before);
    if let Some(layer) = layer_from(chunk, held) {
        import(layer).map_err(TransferError::Worker)?;
    }
    Ok(())
}

/// What a split request's prefill node sent back.
pub struct RemotePrefill {
    pub ticket: Ticket,
    pub first: u32,
    /// The prefill node's compute and the K/V's arrival, in ms from the start of the transfer.
    pub prefill: [f64; 2],
    pub kv: Option<[f64; 2]>,
}

/// Has `peer` prefill `req.prompt` and streams its K/V into a parked sequence here, skipping what
/// this node's prefix cache holds. On failure the parked sequence is freed.
pub async fn prefill_remote(app: &App, loaded: &Loaded, peer: PeerId, req: &Request) -> Result<RemotePrefill, TransferError> {
    let session = session_id();
    let shape = shape(loaded, session)?;
    let started = Instant::now();
    let (ticket, held) = park(loaded, req.prompt.clone()).await?;
    let result = async {
        let stream = app.mesh.handle.open_stream(peer, KV_PROTOCOL).await.map_err(TransferError::Open)?;
        let mut s = FramedStream::new(stream, KV_LIMITS);
        let sp = req.sampling;
        let open = KvOpen::Prefill {
            v: PROTOCOL_VERSION,
            session,
            model: loaded.model_id.clone(),
            fingerprint: loaded.fingerprint.clone(),
            tokens: req.prompt.clone(),
            skip: held,
            sampling: KvSampling { temperature: sp.temperature, top_k: sp.top_k, top_p: sp.top_p, seed: sp.seed },
        };
        s.send_msg(&open).await?;
        s.finish().await?;
        let mut progress = KvProgress::new(loaded.layers as usize, held, req.prompt.len());
        let (mut first_chunk, mut last_chunk) = (None, None);
        let mut first = None;
        let mut busy_s = 0.0;
        let mut prefill_span = [0.0, 0.0];
        while let Some(frame) = s.recv().await? {
            if first.is_some() {
                return Err(TransferError::AfterFirstToken);
            }
            if is_chunk(&frame) {
                let now = Instant::now();
                first_chunk.get_or_insert(now);
                last_chunk = Some(now);
                receive_chunk(app, peer, &frame, &shape, &mut progress, held, |l| loaded.worker.import(ticket.id, l))?;
                continue;
            }
            let reply = serde_json::from_slice::<KvReply>(&frame).map_err(TransferError::MalformedReply)?;
            match reply {
                KvReply::First { token, prefill_ms, first_send_ms, send_busy_ms, layers_ready_ms, layers_sent_ms } => {
                    busy_s = send_busy_ms / 1e3;
                    progress.check_complete()?;
                    if token as usize >= loaded.worker.limits().vocab_size {
                        return Err(TransferError::FirstTokenOutOfRange(token));
                    }
                    app.metrics.kv.prefill.observe(prefill_ms / 1e3);
                    let compute_end = layers_ready_ms.iter().copied().fold(0.0, f64::max);
                    let last_sent = layers_sent_ms.iter().copied().fold(0.0, f64::max);
                    if progress.bytes > 0 {
                        app.metrics.kv.record_overlap(hidden_share(first_send_ms, last_sent, compute_end));
                    }
                    // P's clock starts when it took the request, about when this node asked.
                    prefill_span = [0.0, compute_end];
                    first = Some(token);
                }
                KvReply::Heartbeat => loaded.worker.touch(ticket.id),
                KvReply::Failed { message } => return Err(TransferError::PrefillFailed(message)),
                other @ (KvReply::Parked { .. } | KvReply::Held { .. }) => return Err(TransferError::UnexpectedReply(format!("{other:?}"))),
            }
        }
        let first = first.ok_or(TransferError::NoFirstToken)?;
        seal(loaded, ticket.id).await?;
        app.metrics.kv.received_bytes.inc_by(progress.bytes);
        if let (Some(a), Some(b)) = (first_chunk, last_chunk) {
            let secs = (b - a).as_secs_f64();
            app.metrics.kv.transfer.observe(secs);
            // The stream is paced by the prefill; the link's own speed shows in the sender's
            // time inside sends.
            app.mesh.record_link(peer, progress.bytes, if busy_s > 0.0 { busy_s } else { secs });
        }
        tracing::info!(%peer, session, tokens = req.prompt.len(), held, bytes = progress.bytes, ms = started.elapsed().as_secs_f64() * 1e3, "split prefill: K/V received");
        let since = |t: Instant| (t - started).as_secs_f64() * 1e3;
        let kv = first_chunk.zip(last_chunk).map(|(a, b)| [since(a), since(b)]);
        Ok((first, prefill_span, kv))
    }
    .await;
    match result {
        Ok((first, prefill, kv)) => Ok(RemotePrefill { ticket, first, prefill, kv }),
        Err(e) => {
            // Dropping the ticket frees what arrived.
            app.metrics.kv.rejected_transfers.inc();
            Err(e)
        }
    }
}

/// Moves a detached request's K/V (`tokens` but the last) to another decode node; its peer id
/// and the ticket there, or None when no node could take it (the request is then recomputed).
pub async fn migrate(app: &App, loaded: &Loaded, tokens: &[u32], kv: Vec<KvLayer>) -> Option<(PeerId, u64)> {
    if kv.is_empty() || tokens.len() < 2 {
        return None;
    }
    let targets = super::placement::decode_targets(app, loaded, tokens.len());
    for target in targets.into_iter().take(2) {
        let started = Instant::now();
        match push(app, loaded, target.peer, &tokens[..tokens.len() - 1], &kv).await {
            Ok((ticket, bytes)) => {
                app.metrics.kv.migrated_out.inc();
                app.metrics.kv.sent_bytes.inc_by(bytes);
                tracing::info!(peer = %target.peer, ticket, tokens = tokens.len(), bytes, ms = started.elapsed().as_secs_f64() * 1e3, "migrated a running request's K/V");
                return Some((target.peer, ticket));
            }
            Err(e) => {
                tracing::warn!(peer = %target.peer, error = %e, "moving a request's K/V failed");
                app.mesh.handle.update_view(|v| v.record(MeshEventKind::Rerouted, target.peer, format!("migration failed: {e}")));
            }
        }
    }
    None
}

async fn push(app: &App, loaded: &Loaded, peer: PeerId, tokens: &[u32], kv: &[KvLayer]) -> Result<(u64, u64), TransferError> {
    let session = session_id();
    let shape = shape(loaded, session)?;
    let stream = app.mesh.handle.open_stream(peer, KV_PROTOCOL).await.map_err(TransferError::Open)?;
    let mut s = FramedStream::new(stream, KV_LIMITS);
    let open = KvOpen::Park {
        v: PROTOCOL_VERSION,
        session,
        model: loaded.model_id.clone(),
        fingerprint: loaded.fingerprint.clone(),
        tokens: tokens.to_vec(),
    };
    s.send_msg(&open).await?;
    let mut bytes = 0;
    for layer in kv {
        for frame in chunks(layer, &shape, loaded.kv_dtype) {
            bytes += (frame.len() - 64) as u64;
            s.send(&frame).await?;
        }
    }
    s.finish().await?;
    let reply = s.recv_msg::<KvReply>().await?;
    let end = s.recv().await?;
    match (reply, end) {
        (Some(KvReply::Parked { ticket }), None) => Ok((ticket, bytes)),
        (Some(KvReply::Failed { message }), _) => Err(TransferError::Refused(message)),
        (other, _) => Err(TransferError::UnexpectedReply(format!("{other:?}"))),
    }
}

/// Takes the K/V streams other nodes open to this one.
pub async fn accept_loop(app: Arc<App>) {
    super::node_mesh::accept_streams(app, KV_PROTOCOL, |app, peer, stream| async move { serve_kv(&app, peer, stream).await }).await;
}

/// Refuses or fails a transfer, telling the peer why.
async fn fail(s: &mut Stream, e: TransferError) {
    let _ = s.send_msg(&KvReply::Failed { message: e.to_string() }).await;
    let _ = s.finish().await;
}

async fn serve_kv(app: &Arc<App>, peer: PeerId, stream: tandem_mesh::Stream) {
    let _busy = app.mesh.busy_guard();
    let mut s = FramedStream::new(stream, KV_LIMITS);
    let open = match s.recv_msg::<KvOpen>().await {
        Ok(Some(o)) => o,
        Ok(None) => return,
        Err(e) => {
            // Chunks nobody asked for land here too: they are not an opening message.
            tracing::warn!(%peer, error = %e, "K/V stream without a valid opening: ignored");
            app.metrics.kv.rejected_transfers.inc();
            return;
        }
    };
    // A stage transfer carries no tokens: its positions are bounded by the session it names,
    // which reserved them.
    let (v, model, fingerprint, tokens) = match &open {
        KvOpen::Prefill { v, model, fingerprint, tokens, .. } | KvOpen::Park { v, model, fingerprint, tokens, .. } => {
            (*v, model, fingerprint, Some(&tokens[..]))
        }
        KvOpen::Stage { v, model, fingerprint, .. } => (*v, model, fingerprint, None),
    };
    let loaded = match app.loaded() {
        Ok(l) => l,
        Err(e) => return fail(&mut s, TransferError::Unavailable(e)).await,
    };
    let problem = if v != PROTOCOL_VERSION {
        Some(TransferError::Version(v))
    } else if *model != loaded.model_id || *fingerprint != loaded.fingerprint {
        Some(TransferError::Mismatch { model: loaded.model_id.clone(), fingerprint: loaded.fingerprint.clone() })
    } else if let Some(t) = tokens.filter(|t| t.is_empty() || t.len() >= loaded.worker.limits().context_length) {
        Some(TransferError::TooLong { tokens: t.len(), context: loaded.worker.limits().context_length })
    } else if let Some(&bad) = tokens.into_iter().flatten().find(|&&t| t as usize >= loaded.worker.limits().vocab_size) {
        Some(TransferError::TokenOutOfRange(bad))
    } else if app.mesh.draining() {
        Some(TransferError::Draining)
    } else {
        None
    };
    if let Some(p) = problem {
        tracing::warn!(%peer, problem = %p, "K/V stream refused");
        return fail(&mut s, p).await;
    }
    match open {
        KvOpen::Prefill { session, tokens, skip, sampling, .. } => {
            if !matches!(app.mesh.role(), Role::Prefill | Role::Both) {
                return fail(&mut s, TransferError::Role(app.mesh.role())).await;
            }
            if skip >= tokens.len() {
                return fail(&mut s, TransferError::NothingToPrefill { skip, tokens: tokens.len() }).await;
            }
            serve_prefill(app, &loaded, peer, s, session, tokens, skip, sampling).await
        }
        KvOpen::Park { session, tokens, .. } => {
            if !matches!(app.mesh.role(), Role::Decode | Role::Both) {
                return fail(&mut s, TransferError::Role(app.mesh.role())).await;
            }
            receive_park(app, &loaded, peer, s, session, tokens).await
        }
        KvOpen::Stage { session, stage_session, layers, positions, .. } => {
            let held = super::stages::held_span(&loaded);
            if layers != held || layers[0] >= layers[1] {
                return fail(&mut s, TransferError::Span { want: layers, have: held }).await;
            }
            receive_stage(app, &loaded, peer, s, session, stage_session, layers, positions as usize).await
        }
    }
}

struct LayerChannel(mpsc::Sender<(Instant, KvLayer)>);

/// The longest a prefill node's GPU thread waits for room to queue a layer: beyond it the
/// decode node is taken for stalled and its request is dropped, rather than stall the batch.
const EXPORT_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

impl KvExport for LayerChannel {
    fn layer(&mut self, kv: KvLayer) -> bool {
        // On the GPU thread: waiting here is the backpressure that bounds layers in flight.
        let since = Instant::now();
        let mut item = (since, kv);
        loop {
            match self.0.try_send(item) {
                Ok(()) => return true,
                Err(mpsc::error::TrySendError::Closed(_)) => return false,
                Err(mpsc::error::TrySendError::Full(back)) if since.elapsed() < EXPORT_WAIT => {
                    item = back;
                    std::thread::sleep(std::time::Duration::from_micros(200));
                }
                Err(mpsc::error::TrySendError::Full(_)) => {
                    tracing::warn!("a decode node takes no K/V for {EXPORT_WAIT:?}: dropping its prefill");
                    return false;
                }
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn serve_prefill(
    app: &App,
    loaded: &Loaded,
    peer: PeerId,
    mut s: Stream,
    session: u64,
    tokens: Vec<u32>,
    skip: usize,
    sampling: KvSampling,
) {
    let shape = match shape(loaded, session) {
        Ok(x) => x,
        Err(e) => return fail(&mut s, e).await,
    };
    let (ltx, mut lrx) = mpsc::channel(LAYERS_IN_FLIGHT);
    let (etx, mut erx) = mpsc::unbounded_channel();
    let sampling = tandem_core::SamplingParams {
        temperature: sampling.temperature,
        top_k: sampling.top_k,
        top_p: sampling.top_p,
        seed: sampling.seed,
    };
    let n_tokens = tokens.len();
    let req = Request { prompt: tokens, max_tokens: 1, sampling, stop_ids: Vec::new(), resumed: Vec::new() };
    let t0 = Instant::now();
    let start = Start::Export { sink: Box::new(LayerChannel(ltx)), from: skip };
    let id = match loaded.worker.submit_with(req, Box::new(super::events::ChannelSink(etx)), start) {
        Ok(id) => id,
        Err(e) => return fail(&mut s, TransferError::Worker(e)).await,
    };
    // Dropped on any early return: the request is cancelled and its blocks freed.
    let mut guard = super::events::CancelGuard { worker: loaded.worker.clone(), id: Some(id), finished: false };
    app.metrics.kv.prefills_served.inc();
    let layers = loaded.layers as usize;
    let (mut ready_ms, mut sent_ms, mut first_send_ms) = (vec![0.0; layers], vec![0.0; layers], None);
    let ms = |t: Instant| (t - t0).as_secs_f64() * 1e3;
    let mut bytes = 0u64;
    let mut busy = std::time::Duration::ZERO;
    loop {
        let (ready, kv) = match tokio::time::timeout(tandem_mesh::HEARTBEAT, lrx.recv()).await {
            Ok(Some(x)) => x,
            Ok(None) => break,
            Err(_) => {
                // A long step (a slow adapter, a long prompt chunk): tell D this node is alive.
                if let Err(e) = s.send_msg(&KvReply::Heartbeat).await {
                    tracing::warn!(%peer, session, error = %e, "the decode node went away during the prefill: cancelling it");
                    return;
                }
                continue;
            }
        };
        let (layer, start, n) = (kv.layer, kv.start, kv.tokens);
        let send_start = Instant::now();
        first_send_ms.get_or_insert(ms(send_start));
        for frame in chunks(&kv, &shape, loaded.kv_dtype) {
            bytes += (frame.len() - 64) as u64;
            if let Err(e) = s.send(&frame).await {
                tracing::warn!(%peer, session, error = %e, "the decode node went away mid-transfer: cancelling the prefill");
                return;
            }
        }
        let sent = Instant::now();
        busy += sent - send_start;
        if let (Some(r), Some(x)) = (ready_ms.get_mut(layer), sent_ms.get_mut(layer)) {
            *r = ms(ready);
            *x = ms(sent);
        }
        tracing::debug!(
            session,
            layer,
            start,
            tokens = n,
            ready_ms = ms(ready),
            send_start_ms = ms(send_start),
            sent_ms = ms(sent),
            "kv chunk sent"
        );
    }
    let mut first = None;
    while let Some(ev) = erx.recv().await {
        match ev {
            Event::Token(t) => first = Some(t),
            Event::Finished(..) => break,
            Event::Refused { reason, .. } | Event::Failed(reason) => {
                guard.finished = true;
                return fail(&mut s, TransferError::Scheduler(reason)).await;
            }
            Event::Detached { .. } => {
                guard.finished = true;
                return fail(&mut s, TransferError::Draining).await;
            }
        }
    }
    guard.finished = true;
    let Some(token) = first else { return fail(&mut s, TransferError::NoToken).await };
    app.metrics.kv.sent_bytes.inc_by(bytes);
    let prefill_ms = ms(Instant::now());
    let first_send_ms = first_send_ms.unwrap_or(prefill_ms);
    let send_busy_ms = busy.as_secs_f64() * 1e3;
    let reply = KvReply::First { token, prefill_ms, first_send_ms, send_busy_ms, layers_ready_ms: ready_ms, layers_sent_ms: sent_ms };
    if s.send_msg(&reply).await.is_ok() && s.finish().await.is_ok() {
        tracing::info!(%peer, session, tokens = n_tokens, skip, bytes, prefill_ms, send_busy_ms, "prefill for a decode node done");
    }
}

async fn receive_park(app: &App, loaded: &Loaded, peer: PeerId, mut s: Stream, session: u64, tokens: Vec<u32>) {
    let shape = match shape(loaded, session) {
        Ok(x) => x,
        Err(e) => return fail(&mut s, e).await,
    };
    let n = tokens.len();
    let (ticket, held) = match park(loaded, tokens).await {
        Ok(x) => x,
        Err(e) => return fail(&mut s, e).await,
    };
    let mut progress = KvProgress::new(loaded.layers as usize, 0, n);
    let result = async {
        while let Some(frame) = s.recv().await? {
            if !is_chunk(&frame) {
                return Err(TransferError::NotKv);
            }
            receive_chunk(app, peer, &frame, &shape, &mut progress, held, |l| loaded.worker.import(ticket.id, l))?;
        }
        progress.check_complete()?;
        seal(loaded, ticket.id).await
    }
    .await;
    match result {
        Ok(()) => {
            app.metrics.kv.received_bytes.inc_by(progress.bytes);
            app.metrics.kv.migrated_in.inc();
            // The request comes through the entry node; unclaimed, the K/V expires.
            let ticket = ticket.keep();
            tracing::info!(%peer, ticket, tokens = n, held, bytes = progress.bytes, "parked a moved request's K/V");
            let _ = s.send_msg(&KvReply::Parked { ticket }).await;
            let _ = s.finish().await;
        }
        Err(e) => {
            drop(ticket);
            app.metrics.kv.rejected_transfers.inc();
            tracing::warn!(%peer, error = %e, "K/V transfer rejected; nothing of it is kept");
            fail(&mut s, e).await;
        }
    }
}

/// Hands the K/V of a prefill stage's session to the decode stage `to`, one step's positions at a
/// time as `ranges` names them, as each step's answer has gone to the driver. Ends when `ranges`
/// closes (the driver ended its steps): the positions the decode stage then holds.
pub async fn hand_off(
    app: Arc<App>,
    loaded: Arc<Loaded>,
    session: u64,
    to: tandem_mesh::Handoff,
    layers: [u32; 2],
    positions: u32,
    mut ranges: mpsc::Receiver<(usize, usize)>,
) -> Result<u32, TransferError> {
    let peer: PeerId = to.peer.parse().map_err(|_| TransferError::Refused(format!("{:?} is not a peer id", to.peer)))?;
    let transfer = session_id();
    let shape = shape(&loaded, transfer)?;
    let stream = app.mesh.handle.open_stream(peer, KV_PROTOCOL).await.map_err(TransferError::Open)?;
    let mut s = FramedStream::new(stream, KV_LIMITS);
    let open = KvOpen::Stage {
        v: PROTOCOL_VERSION,
        session: transfer,
        model: loaded.model_id.clone(),
        fingerprint: loaded.fingerprint.clone(),
        stage_session: to.session,
        layers,
        positions,
    };
    s.send_msg(&open).await?;
    let (mut bytes, mut sent) = (0u64, 0usize);
    let started = Instant::now();
    while let Some((start, end)) = ranges.recv().await {
        let (reply, rx) = answer();
        loaded.worker.stage_export(session, start, end, reply).map_err(TransferError::Worker)?;
        let kv = rx.await.map_err(|_| TransferError::WorkerStopped)?.map_err(TransferError::Worker)?;
        for layer in &kv {
            for frame in chunks(layer, &shape, loaded.kv_dtype) {
                bytes += (frame.len() - 64) as u64;
                s.send(&frame).await?;
            }
        }
        sent = end;
    }
    s.finish().await?;
    let reply = s.recv_msg::<KvReply>().await?;
    app.metrics.kv.sent_bytes.inc_by(bytes);
    match reply {
        Some(KvReply::Held { positions }) => {
            tracing::debug!(%peer, positions, bytes, ms = started.elapsed().as_secs_f64() * 1e3, "a span's K/V handed to its decode stage");
            Ok(positions)
        }
        Some(KvReply::Failed { message }) => Err(TransferError::Refused(message)),
        other => Err(TransferError::UnexpectedReply(format!("{other:?} after {sent} positions"))),
    }
}

/// Takes a prefill stage's K/V of this node's span into the stage session it names, checking
/// every chunk against the transfer; answers `Held` once the session holds every position.
#[allow(clippy::too_many_arguments)]
async fn receive_stage(
    app: &App,
    loaded: &Loaded,
    peer: PeerId,
    mut s: Stream,
    transfer: u64,
    stage_session: u64,
    layers: [u32; 2],
    positions: usize,
) {
    let shape = match shape(loaded, transfer) {
        Ok(x) => x,
        Err(e) => return fail(&mut s, e).await,
    };
    let mut progress = KvProgress::span(layers[0] as usize..layers[1] as usize, 0, positions);
    let result = async {
        while let Some(frame) = s.recv().await? {
            if !is_chunk(&frame) {
                return Err(TransferError::NotKv);
            }
            receive_chunk(app, peer, &frame, &shape, &mut progress, 0, |l| loaded.worker.stage_import(stage_session, l))?;
        }
        progress.check_complete()?;
        let (reply, rx) = answer();
        loaded.worker.stage_held(stage_session, reply).map_err(TransferError::Worker)?;
        let held = rx.await.map_err(|_| TransferError::WorkerStopped)?.map_err(TransferError::Worker)?;
        if held != positions {
            return Err(TransferError::Short { held, want: positions });
        }
        Ok(())
    }
    .await;
    match result {
        Ok(()) => {
            app.metrics.kv.received_bytes.inc_by(progress.bytes);
            tracing::debug!(%peer, positions, bytes = progress.bytes, "a prefill stage's K/V taken");
            let _ = s.send_msg(&KvReply::Held { positions: positions as u32 }).await;
            let _ = s.finish().await;
        }
        Err(e) => {
            app.metrics.kv.rejected_transfers.inc();
            tracing::warn!(%peer, error = %e, "a prefill stage's K/V refused");
            fail(&mut s, e).await;
        }
    }
}
