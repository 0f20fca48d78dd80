//! Driving a request through a chain of stages, from the node holding the first layers (which
//! embeds, and has the tokenizer): each step goes through this node's own span, then through
//! each later stage over `/tandem/hidden/1`, and the last stage's sampled token comes back here,
//! where it becomes an `Event` like a local worker's. Every stage's sessions batch with other
//! requests' steps on that stage (`tandem_core::stage`), so the pipeline stays full across
//! concurrent requests.
//!
//! A split chain's prompt runs on its prefill stages instead, each handing its span's K/V to the
//! decode stage of the same span as the steps go (`stages.rs`); once every decode stage holds the
//! prompt, the decode stages go on from the first token the last prefill stage sampled.
//!
//! A stage lost mid-request does not lose the request: this node keeps every token (prompt and
//! generated), builds another chain without the lost node, and recomputes every stage's K/V
//! from those tokens before the next step, as Petals' clients do. The next token is sampled at
//! the same position with the same seed, so the client's stream goes on with no gap and no
//! repeat (and, in deterministic mode, with the tokens it would have had).

use std::sync::Arc;
use std::time::{Duration, Instant};

use tandem_core::scheduler::{Event, FinishReason, Request, RequestTimings};
use tandem_core::stage::{StageOut, StageStep};
use tandem_core::{Engine, SamplingParams};
use tandem_mesh::{
    Chain, DTYPE_F16, DTYPE_F32, FramedStream, HIDDEN_LIMITS, HIDDEN_PROTOCOL, Handoff, HiddenOpen, HiddenOutput, HiddenReply, HiddenShape,
    HiddenStep, MeshEventKind, PROTOCOL_VERSION, PeerId, PlacementRequest, Stage, StageOut as WireOut, WireSampling,
};
use tokio::sync::mpsc;

use super::stages::{StageError, held_span, open_session, step_session};
use super::{App, Loaded};

/// Chains one request may build after the first fails.
const MAX_REBUILDS: usize = 4;
/// How long a request waits for a chain to exist (a replacement stage still joining).
const CHAIN_WAIT: Duration = Duration::from_secs(10);

/// Why a chain failed; `stage` is the index of the stage at fault, when one is.
#[derive(Debug, thiserror::Error)]
enum ChainError {
    #[error("no chain of nodes covers layers {held:?} onward of {model} (is every span served?)")]
    NoChain { model: String, held: [u32; 2] },
    #[error("stage {stage} ({peer}): {source}")]
    Remote { stage: usize, peer: PeerId, source: RemoteError },
    #[error("this node's own stage: {0}")]
    Local(#[from] StageError),
}

/// What went wrong with a remote stage.
#[derive(Debug, thiserror::Error)]
enum RemoteError {
    #[error("cannot open a stream: {0}")]
    Open(String),
    #[error("stream: {0}")]
    Frame(#[from] tandem_mesh::FrameError),
    #[error("refused: {0}")]
    Refused(String),
    #[error("malformed answer: {0}")]
    Malformed(#[from] tandem_mesh::HiddenError),
    #[error("answered step {got}, expected {want}")]
    OutOfStep { want: u32, got: u32 },
    #[error("answered {0} where the chain needed the other kind of output")]
    WrongOutput(&'static str),
    #[error("the stream ended")]
    Ended,
    #[error("hidden states of width {got}, this model's are {want}")]
    Width { want: usize, got: u32 },
    #[error("handed {got} positions' K/V to its decode stage, the prompt has {want}")]
    HandedOff { want: usize, got: u32 },
}

/// One stage as this node reaches it.
enum Link {
    Local {
        loaded: Arc<Loaded>,
        session: u64,
        app: Arc<App>,
    },
    /// `step` and `out` are the two directions' shapes (width 0 where one carries no hidden
    /// states: the last stage's output).
    Remote {
        peer: PeerId,
        /// Its session's id there (what a prefill stage names to hand it K/V).
        session: u64,
        stream: Box<FramedStream<tandem_mesh::Stream>>,
        seq_no: u32,
        step: HiddenShape,
        out: HiddenShape,
    },
}

impl Drop for Link {
    fn drop(&mut self) {
        if let Link::Local { loaded, session, app } = self {
            loaded.worker.stage_close(*session);
            app.metrics.chain.stage_sessions.dec();
        }
    }
}

/// Bounds of the chain's steps: the tightest stage's.
#[derive(Clone, Copy)]
struct StepBounds {
    tokens: usize,
    attention: usize,
}

async fn open_remote(
    app: &App,
    loaded: &Loaded,
    peer: PeerId,
    layers: [u32; 2],
    positions: usize,
    handoff: Option<Handoff>,
) -> Result<(Link, StepBounds), RemoteError> {
    let stream = app.mesh.handle.open_stream(peer, HIDDEN_PROTOCOL).await.map_err(|e| RemoteError::Open(e.to_string()))?;
    let mut stream = FramedStream::new(stream, HIDDEN_LIMITS);
    let dtype = if app.cfg.deterministic { DTYPE_F32 } else { DTYPE_F16 };
    let open = HiddenOpen {
        v: PROTOCOL_VERSION,
        model: loaded.model_id.clone(),
        fingerprint: loaded.fingerprint.clone(),
        layers,
        positions: positions as u32,
        wire_dtype: dtype,
        handoff,
    };
    stream.send_msg(&open).await?;
    match stream.recv_msg::<HiddenReply>().await? {
        Some(HiddenReply::Opened { hidden_size, .. }) if hidden_size as usize != loaded.hidden_size => {
            Err(RemoteError::Width { want: loaded.hidden_size, got: hidden_size })
        }
        Some(HiddenReply::Opened { max_step_tokens, attention_budget, hidden_size, session }) => Ok((
            Link::Remote {
                peer,
                session,
                stream: Box::new(stream),
                seq_no: 0,
                // The first stage embeds: its steps carry no hidden states.
                step: HiddenShape { width: if layers[0] > 0 { hidden_size } else { 0 }, dtype },
                out: HiddenShape { width: if layers[1] < loaded.layers { hidden_size } else { 0 }, dtype },
            },
            StepBounds { tokens: max_step_tokens as usize, attention: attention_budget as usize },
        )),
        Some(HiddenReply::Failed { message }) => Err(RemoteError::Refused(message)),
        Some(HiddenReply::HandedOff { .. }) => Err(RemoteError::WrongOutput("`handed_off`")),
        None => Err(RemoteError::Ended),
    }
}

impl Link {
    /// Where a prefill stage of the same span hands this stage its K/V.
    fn handoff(&self, app: &App) -> Handoff {
        match self {
            Link::Local { session, .. } => Handoff { peer: app.mesh.handle.peer_id().to_string(), session: *session },
            Link::Remote { peer, session, .. } => Handoff { peer: peer.to_string(), session: *session },
        }
    }

    /// Ends a prefill stage's steps and waits until its decode stage holds all `positions`.
    async fn end_handoff(&mut self, positions: usize) -> Result<(), RemoteError> {
        let Link::Remote { stream, .. } = self else { unreachable!("prefill stages are other nodes") };
        stream.finish().await?;
        match stream.recv_msg::<HiddenReply>().await? {
            Some(HiddenReply::HandedOff { positions: got }) if got as usize == positions => Ok(()),
            Some(HiddenReply::HandedOff { positions: got }) => Err(RemoteError::HandedOff { want: positions, got }),
            Some(HiddenReply::Failed { message }) => Err(RemoteError::Refused(message)),
            Some(HiddenReply::Opened { .. }) => Err(RemoteError::WrongOutput("`opened`")),
            None => Err(RemoteError::Ended),
        }
    }

    async fn step(&mut self, app: &App, step: StageStep, last: bool) -> Result<StageOut, RemoteError> {
        let Link::Remote { peer, stream, seq_no, step: step_shape, out: out_shape, .. } = self else {
            unreachable!("local steps go to the worker")
        };
        *seq_no += 1;
        let wire = HiddenStep {
            seq_no: *seq_no,
            start: step.start as u32,
            tokens: step.tokens,
            sample: step.sample.map(|s| WireSampling { temperature: s.temperature, top_k: s.top_k, top_p: s.top_p, seed: s.seed }),
            hidden: step.hidden,
        };
        let frame = wire.encode(*step_shape)?;
        app.metrics.chain.hidden_sent_bytes.inc_by(frame.len() as u64);
        stream.send(&frame).await?;
        let answer = stream.recv().await?.ok_or(RemoteError::Ended)?;
        app.metrics.chain.hidden_received_bytes.inc_by(answer.len() as u64);
        app.mesh.count_hidden_bytes(*peer, answer.len() as u64);
        if !tandem_mesh::is_hidden_frame(&answer) {
            return match serde_json::from_slice::<HiddenReply>(&answer) {
                Ok(HiddenReply::Failed { message }) => Err(RemoteError::Refused(message)),
                _ => Err(RemoteError::WrongOutput("a message")),
            };
        }
        let out = HiddenOutput::decode(&answer, *out_shape)?;
        if out.seq_no != *seq_no {
            return Err(RemoteError::OutOfStep { want: *seq_no, got: out.seq_no });
        }
        match (out.out, last) {
            (WireOut::Hidden(h), false) => Ok(StageOut::Hidden(h)),
            (WireOut::Tokens(t), true) => Ok(StageOut::Token(t.into_iter().next().flatten())),
            (WireOut::Hidden(_), true) => Err(RemoteError::WrongOutput("hidden states")),
            (WireOut::Tokens(_), false) => Err(RemoteError::WrongOutput("tokens")),
        }
    }
}

/// The best chain from this node's span onward, without `exclude`.
fn plan_chain(app: &App, loaded: &Loaded, prompt_tokens: usize, output_tokens: usize, exclude: &[PeerId]) -> Option<Chain> {
    super::node_mesh::refresh_own(app);
    let req = PlacementRequest { model: &loaded.model_id, prompt_tokens, output_tokens, affinity: None, exclude, mode: app.cfg.placement };
    let view = app.mesh.handle.view();
    let view = view.read().unwrap_or_else(std::sync::PoisonError::into_inner);
    let held = held_span(loaded);
    tandem_mesh::chains(&view, &req).into_iter().find(|c| c.stages.first().is_some_and(|s| s.is_self && s.layers == held))
}

/// Links to `stages`, each session holding up to `positions` positions; a prefill chain's stages
/// hand their K/V to `handoffs`, one per stage.
async fn open_links(
    app: &Arc<App>,
    loaded: &Arc<Loaded>,
    stages: &[Stage],
    positions: usize,
    handoffs: Option<Vec<Handoff>>,
) -> Result<(Vec<Link>, StepBounds), ChainError> {
    let mut links = Vec::with_capacity(stages.len());
    let mut bounds = StepBounds { tokens: loaded.max_step_tokens, attention: loaded.attention_budget };
    let mut handoffs = handoffs.map(Vec::into_iter);
    for (i, stage) in stages.iter().enumerate() {
        let handoff = handoffs.as_mut().and_then(Iterator::next);
        if stage.is_self {
            if handoff.is_some() {
                return Err(ChainError::Local(StageError::NotReady("a prefill stage on the driving node".into())));
            }
            let session = open_session(&loaded.worker, positions).await?;
            app.metrics.chain.stage_sessions.inc();
            links.push(Link::Local { loaded: loaded.clone(), session, app: app.clone() });
            continue;
        }
        let (link, b) = open_remote(app, loaded, stage.peer, stage.layers, positions, handoff)
            .await
            .map_err(|source| ChainError::Remote { stage: i, peer: stage.peer, source })?;
        links.push(link);
        bounds = StepBounds { tokens: bounds.tokens.min(b.tokens), attention: bounds.attention.min(b.attention) };
    }
    Ok((links, bounds))
}

/// Runs `tokens` through the prefill chain `stages`, each stage handing its span's K/V to the
/// decode stage of the same span (`handoffs`), and waits until every decode stage holds them:
/// the token sampled after them.
async fn prefill_split(
    app: &Arc<App>,
    loaded: &Arc<Loaded>,
    handoffs: Vec<Handoff>,
    stages: &[Stage],
    tokens: &[u32],
    sample: SamplingParams,
) -> Result<Option<u32>, ChainError> {
    let (mut links, bounds) = open_links(app, loaded, stages, tokens.len(), Some(handoffs)).await?;
    let next = prefill(app, &mut links, bounds, tokens, sample).await?;
    for (i, (link, stage)) in links.iter_mut().zip(stages).enumerate() {
        link.end_handoff(tokens.len()).await.map_err(|source| ChainError::Remote { stage: i, peer: stage.peer, source })?;
    }
    app.metrics.chain.split_prefills.inc();
    Ok(next)
}

/// One step through every stage: the sampled token where `sample` asks for one.
async fn step_chain(
    app: &App,
    links: &mut [Link],
    start: usize,
    tokens: &[u32],
    sample: Option<SamplingParams>,
) -> Result<Option<u32>, ChainError> {
    let n = links.len();
    let mut hidden = None;
    for (i, link) in links.iter_mut().enumerate() {
        let last = i + 1 == n;
        let step = StageStep { start, tokens: tokens.to_vec(), hidden: hidden.take(), sample: if last { sample } else { None } };
        let out = match link {
            Link::Local { loaded, session, .. } => step_session(&loaded.worker, *session, step).await?,
            Link::Remote { peer, .. } => {
                let peer = *peer;
                link.step(app, step, last).await.map_err(|source| ChainError::Remote { stage: i, peer, source })?
            }
        };
        match out {
            StageOut::Hidden(h) => hidden = Some(h),
            StageOut::Token(t) => return Ok(t),
        }
    }
    Ok(None)
}

/// Feeds `tokens` from position 0 through the chain in steps within its bounds; the last step
/// samples.
async fn prefill(
    app: &App,
    links: &mut [Link],
    bounds: StepBounds,
    tokens: &[u32],
    sample: SamplingParams,
) -> Result<Option<u32>, ChainError> {
    let mut at = 0;
    let mut next = None;
    while at < tokens.len() {
        let n = Engine::prefill_fit(at, tokens.len() - at, bounds.attention, bounds.tokens).max(1);
        let end = at + n;
        next = step_chain(app, links, at, &tokens[at..end], (end == tokens.len()).then_some(sample)).await?;
        at = end;
    }
    Ok(next)
}

/// Runs `request` through chains of stages from this node, its events going to `tx` as a
/// worker's would.
pub async fn run(app: Arc<App>, loaded: Arc<Loaded>, request: Request, tx: mpsc::UnboundedSender<Event>) {
    app.metrics.chain.driven_requests.inc();
    let arrival = Instant::now();
    let positions = request.prompt.len() + request.max_tokens;
    // Every token the stages must hold before the next step: the prompt, then each generated
    // token once it is delivered.
    let mut tokens: Vec<u32> = request.prompt.iter().chain(&request.resumed).copied().collect();
    let mut generated = request.resumed.len();
    let mut exclude: Vec<PeerId> = Vec::new();
    let mut first_token = None;
    let mut last_error = None;
    for _attempt in 0..=MAX_REBUILDS {
        let chain = match wait_for_chain(&app, &loaded, &request, &exclude).await {
            Ok(c) => c,
            Err(e) => {
                last_error = Some(e);
                break;
            }
        };
        tracing::debug!(stages = chain.stages.len(), tokens = tokens.len(), "driving a request through a chain");
        let result = async {
            let (mut links, bounds) = open_links(&app, &loaded, &chain.stages, positions, None).await?;
            let mut next = match &chain.prefill {
                Some(stages) => {
                    let handoffs = links.iter().map(|l| l.handoff(&app)).collect();
                    prefill_split(&app, &loaded, handoffs, stages, &tokens, request.sampling).await?
                }
                None => prefill(&app, &mut links, bounds, &tokens, request.sampling).await?,
            };
            loop {
                let Some(id) = next else { return Ok(None) };
                generated += 1;
                first_token.get_or_insert_with(Instant::now);
                if tx.send(Event::Token(id)).is_err() {
                    return Ok(Some(FinishReason::Cancelled));
                }
                if request.stop_ids.contains(&id) {
                    return Ok(Some(FinishReason::Stop));
                }
                if generated >= request.max_tokens {
                    return Ok(Some(FinishReason::Length));
                }
                tokens.push(id);
                next = step_chain(&app, &mut links, tokens.len() - 1, &tokens[tokens.len() - 1..], Some(request.sampling)).await?;
            }
        }
        .await;
        match result {
            Ok(Some(finish)) => {
                let e2e = arrival.elapsed();
                let ttft = first_token.map(|t| t - arrival);
                let after_first = generated.saturating_sub(request.resumed.len() + 1);
                let tpot = first_token.filter(|_| after_first > 0).map(|t| t.elapsed() / after_first as u32);
                let timings = RequestTimings {
                    prompt_tokens: request.prompt.len(),
                    generated_tokens: generated,
                    ttft,
                    e2e,
                    tpot,
                    ..Default::default()
                };
                let _ = tx.send(Event::Finished(finish, timings));
                return;
            }
            Ok(None) => {
                last_error = Some(ChainError::Local(StageError::NotReady("the last stage sampled nothing".into())));
                break;
            }
            Err(ChainError::Remote { stage, peer, source }) => {
                tracing::warn!(stage, %peer, error = %source, "a stage failed: building another chain");
                app.metrics.chain.rebuilds.inc();
                app.mesh.handle.update_view(|v| v.record(MeshEventKind::Rerouted, peer, format!("chain stage lost: {source}")));
                exclude.push(peer);
                last_error = Some(ChainError::Remote { stage, peer, source });
            }
            Err(e) => {
                last_error = Some(e);
                break;
            }
        }
    }
    let message = last_error.map_or_else(|| "the chain failed".to_string(), |e| e.to_string());
    let _ = tx.send(Event::Failed(message));
}

/// The best chain now, or once one exists (a replacement stage may still be joining).
async fn wait_for_chain(app: &App, loaded: &Loaded, request: &Request, exclude: &[PeerId]) -> Result<Chain, ChainError> {
    let deadline = Instant::now() + CHAIN_WAIT;
    loop {
        if let Some(c) = plan_chain(app, loaded, request.prompt.len(), request.max_tokens, exclude) {
            return Ok(c);
        }
        if Instant::now() >= deadline {
            return Err(ChainError::NoChain { model: loaded.model_id.clone(), held: held_span(loaded) });
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
