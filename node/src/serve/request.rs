//! A request's lifecycle: `drive` runs it on the local worker (after a remote prefill, or from
//! where another node left it) and turns its events into pieces of output (token ids, text with
//! stop strings applied and what the client already has held back, the end); on the entry node,
//! `ClientHas` keeps what the client has been sent, from which another node can continue it.

use std::sync::Arc;

use tandem_core::scheduler::{self, Event, Start};
use tandem_mesh::{FinishReason, InferResume};
use tokio::sync::mpsc;

use super::error::ServeError;
use super::events::{CancelGuard, ChannelSink};
use super::openai::{Generation, Usage};
use super::{App, Loaded};

/// Token ids one forwarded request may report (its context bounds it).
pub const MAX_FORWARDED_TOKENS: usize = 1 << 20;

/// Holds back text that may be the start of a stop string, and cuts at the first stop string.
struct StopMatcher {
    stops: Vec<String>,
    pending: String,
}

impl StopMatcher {
    /// Text that is safe to send now, and whether a stop string was found.
    fn push(&mut self, piece: &str) -> (String, bool) {
        self.pending.push_str(piece);
        if let Some(at) = self.stops.iter().filter_map(|s| self.pending.find(s.as_str())).min() {
            let out = self.pending[..at].to_string();
            self.pending.clear();
            return (out, true);
        }
        let keep = self
            .stops
            .iter()
            .flat_map(|s| (1..s.len()).rev().filter(|&n| s.is_char_boundary(n) && self.pending.ends_with(&s[..n])).take(1))
            .max()
            .unwrap_or(0);
        let cut = self.pending.len() - keep;
        let out = self.pending[..cut].to_string();
        self.pending.drain(..cut);
        (out, false)
    }

    fn flush(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }
}

/// One piece of output of a generation.
pub enum Piece {
    /// A generated token's id, before its text (the entry node keeps them to resume elsewhere).
    Token(u32),
    Text(String),
    Done {
        finish: FinishReason,
        usage: Usage,
    },
    Failed(ServeError),
    /// The request left its node (draining) and continues on `peer` from the K/V parked there
    /// under `ticket`, or, without them, anywhere from the tokens so far.
    Moved {
        peer: Option<tandem_mesh::PeerId>,
        ticket: Option<u64>,
    },
}

/// How a generation starts beyond its request.
#[derive(Default)]
pub struct Continue {
    /// It continues a request another node started: the client has these tokens and this much
    /// of their text, and K/V for them may be parked here.
    pub resume: Option<tandem_mesh::InferResume>,
    /// Prefill on this node and stream the K/V here (a split request).
    pub prefill: Option<tandem_mesh::PeerId>,
}

/// Tokens to text: the detokenizer and stop strings, holding back text a client already has.
struct TextOut<'a> {
    text: tandem_core::tokenizer::TokenTextStream<'a>,
    stops: StopMatcher,
    stop_ids: Vec<u32>,
    /// Bytes of text produced so far, and how many of them the client has already.
    produced: usize,
    skip: usize,
}

impl TextOut<'_> {
    /// The text to send for one more token, and whether a stop string ended the generation.
    fn push(&mut self, id: u32) -> Result<(String, bool), ServeError> {
        if self.stop_ids.contains(&id) {
            return Ok((String::new(), false));
        }
        let piece = self.text.push(id).map_err(ServeError::Text)?.unwrap_or_default();
        let (safe, stopped) = self.stops.push(&piece);
        Ok((self.unsent(safe), stopped))
    }

    fn flush(&mut self) -> String {
        let rest = self.stops.flush();
        self.unsent(rest)
    }

    fn unsent(&mut self, text: String) -> String {
        let before = self.produced;
        self.produced += text.len();
        if self.produced <= self.skip {
            return String::new();
        }
        let from = self.skip.saturating_sub(before);
        match text.get(from..) {
            Some(rest) => rest.to_string(),
            None => {
                // Cannot happen when the text is regenerated from the same tokens.
                tracing::warn!(from, "resumed text does not split at a character: sending from the next one");
                text.char_indices().find(|&(i, _)| i >= from).map(|(i, _)| text[i..].to_string()).unwrap_or_default()
            }
        }
    }
}

/// Sends one token's id (when the entry node has not seen it) and text. Some(whether a stop
/// string ended the generation), or None when the generation is over (receiver gone, or the
/// text failed and was reported).
async fn deliver(out: &mpsc::Sender<Piece>, text: &mut TextOut<'_>, id: u32, send_id: bool) -> Option<bool> {
    if send_id && out.send(Piece::Token(id)).await.is_err() {
        return None;
    }
    let (safe, stopped) = match text.push(id) {
        Ok(x) => x,
        Err(e) => {
            let _ = out.send(Piece::Failed(e)).await;
            return None;
        }
    };
    if !safe.is_empty() && out.send(Piece::Text(safe)).await.is_err() {
        return None;
    }
    Some(stopped)
}

/// Submits the request and turns its events into text pieces on `out`.
pub async fn drive(loaded: Arc<Loaded>, app: Arc<App>, g: Generation, out: mpsc::Sender<Piece>, cont: Continue) {
    let mut request = g.request;
    let prompt_tokens = request.prompt.len();
    let tok = loaded.tokenizer.clone();
    let mut text = TextOut {
        text: tok.decode_stream(true),
        stops: StopMatcher { stops: g.stops, pending: String::new() },
        stop_ids: request.stop_ids.clone(),
        produced: 0,
        skip: 0,
    };
    let arrival = std::time::Instant::now();
    let mut start = Start::Compute;
    // The K/V a remote prefill parked here, freed if this task ends before the request is in.
    let mut parked = None;
    // Tokens generated before this node took over: replayed silently, or announced (the first
    // token of a split request, which the client has not seen).
    let (mut replay, mut announce) = (Vec::new(), Vec::new());
    // When this node delivered its first new token, in ms from `arrival`.
    let mut first_at = None;
    let mut trace = tandem_mesh::RequestTrace {
        arrived_ms: tandem_mesh::unix_ms(),
        model: loaded.model_id.clone(),
        prompt_tokens: prompt_tokens as u64,
        ..Default::default()
    };
    if let Some(r) = cont.resume {
        app.metrics.kv.resumed_requests.inc();
        text.skip = usize::try_from(r.text_bytes).unwrap_or(usize::MAX);
        replay = r.tokens;
        start = r.ticket.map_or(Start::Compute, Start::Parked);
    } else if let Some(p) = cont.prefill {
        let asked = ms_since(arrival);
        let remote = tokio::select! {
            r = super::kv::prefill_remote(&app, &loaded, p, &request) => r,
            // The client left: dropping the transfer ends it on the prefill node too.
            () = out.closed() => return,
        };
        match remote {
            Ok(r) => {
                trace.prefill_peer = Some(p.to_string());
                trace.prefill = r.prefill.map(|t| t + asked);
                trace.kv = r.kv.map(|s| s.map(|t| t + asked));
                app.metrics.kv.split_requests.inc();
                announce.push(r.first);
                start = Start::Parked(r.ticket.id);
                parked = Some(r.ticket);
            }
            Err(e) => {
                // The prefill node failed or vanished: this node prefills instead.
                app.metrics.kv.split_fallbacks.inc();
                tracing::warn!(peer = %p, error = %e, "remote prefill failed: prefilling here");
                app.mesh.handle.update_view(|v| {
                    v.record(tandem_mesh::MeshEventKind::Rerouted, p, format!("prefill failed, done by the decode node: {e}"))
                });
            }
        }
    }
    let mut generated = 0;
    let done = |finish: FinishReason, generated: usize| Piece::Done {
        finish,
        usage: Usage { prompt_tokens, completion_tokens: generated, total_tokens: prompt_tokens + generated },
    };
    let mut ended = None;
    for (i, &id) in replay.iter().chain(&announce).enumerate() {
        generated += 1;
        let Some(stopped) = deliver(&out, &mut text, id, i >= replay.len()).await else { return };
        if i >= replay.len() {
            first_at.get_or_insert_with(|| ms_since(arrival));
        }
        if stopped || request.stop_ids.contains(&id) {
            ended = Some(FinishReason::Stop);
        } else if generated >= request.max_tokens {
            ended = Some(FinishReason::Length);
        }
        if ended.is_some() {
            break;
        }
    }
    if let Some(finish) = ended {
        // Finished already (the first token was the last): nothing for the scheduler; a
        // remote prefill's parked K/V is freed with `parked`.
        if let (Start::Parked(ticket), None) = (&start, &parked) {
            loaded.worker.discard(*ticket);
        }
        let rest = text.flush();
        if !rest.is_empty() {
            let _ = out.send(Piece::Text(rest)).await;
        }
        let _ = out.send(done(finish, generated)).await;
        return;
    }
    request.resumed = replay.into_iter().chain(announce).collect();
    let resumed = !request.resumed.is_empty();
    let (tx, mut rx) = mpsc::unbounded_channel();
    // From here the scheduler owns the parked K/V (and frees it if it refuses the request).
    if let Some(t) = parked {
        t.keep();
    }
    let id = if loaded.span.is_some() {
        // This node holds only the first layers: a chain of stages runs the request.
        if let Start::Parked(ticket) = start {
            loaded.worker.discard(ticket);
        }
        tokio::spawn(super::chain::run(app.clone(), loaded.clone(), request, tx));
        None
    } else {
        match loaded.worker.submit_with(request, Box::new(ChannelSink(tx)), start) {
            Ok(id) => Some(id),
            Err(e) if resumed && app.mesh.draining() => {
                // Caught by a drain between its prefill and its start: it continues elsewhere.
                tracing::info!(error = %e, "refused while draining: handing the request back");
                let _ = out.send(Piece::Moved { peer: None, ticket: None }).await;
                return;
            }
            Err(e) => {
                let _ = out.send(Piece::Failed(ServeError::Refused(e))).await;
                return;
            }
        }
    };
    let mut guard = CancelGuard { worker: loaded.worker.clone(), id, finished: false };
    loop {
        let event = tokio::select! {
            e = rx.recv() => e,
            () = out.closed() => return,
        };
        let Some(event) = event else { break };
        match event {
            Event::Token(id) => {
                generated += 1;
                first_at.get_or_insert_with(|| ms_since(arrival));
                let Some(stopped) = deliver(&out, &mut text, id, true).await else { return };
                if stopped {
                    let _ = out.send(done(FinishReason::Stop, generated)).await;
                    return;
                }
            }
            Event::Finished(reason, mut timings) => {
                guard.finished = true;
                if trace.prefill_peer.is_some() {
                    // A split request's first token came from the prefill node: its TTFT is
                    // measured here, not by the scheduler (which counts it as resumed).
                    timings.ttft = first_at.map(|ms| std::time::Duration::from_secs_f64(ms / 1e3));
                }
                app.metrics.observe(&timings);
                // All in this node's time from `arrival`: the scheduler's own clock starts only
                // when a split request's K/V has arrived.
                let now = ms_since(arrival);
                let first = first_at.unwrap_or(now);
                if trace.prefill_peer.is_none() {
                    trace.queue_ms = (timings.queued.as_secs_f64() * 1e3).min(first);
                    trace.prefill = [trace.queue_ms, first];
                }
                trace.decode = [first, now];
                trace.output_tokens = generated as u64;
                let rest = text.flush();
                if !rest.is_empty() {
                    let _ = out.send(Piece::Text(rest)).await;
                }
                let finish = match reason {
                    scheduler::FinishReason::Length => FinishReason::Length,
                    scheduler::FinishReason::Stop => FinishReason::Stop,
                    scheduler::FinishReason::Cancelled => FinishReason::Cancelled,
                };
                trace.outcome = finish.as_str().into();
                app.metrics.trace(trace);
                let _ = out.send(done(finish, generated)).await;
                return;
            }
            Event::Refused { overloaded: true, .. } if resumed && app.mesh.draining() => {
                guard.finished = true;
                let _ = out.send(Piece::Moved { peer: None, ticket: None }).await;
                return;
            }
            Event::Refused { overloaded, reason } => {
                guard.finished = true;
                let _ = out.send(Piece::Failed(ServeError::Rejected { overloaded, reason })).await;
                return;
            }
            Event::Detached { tokens, kv } => {
                // This node is draining: move the K/V to another decode node and tell the entry
                // node where the request continues.
                guard.finished = true;
                let now = ms_since(arrival);
                trace.decode = [first_at.unwrap_or(now), now];
                trace.output_tokens = generated as u64;
                trace.outcome = "moved".into();
                app.metrics.trace(trace);
                let moved = super::kv::migrate(&app, &loaded, &tokens, kv).await;
                let (peer, ticket) = moved.map_or((None, None), |(p, t)| (Some(p), Some(t)));
                let _ = out.send(Piece::Moved { peer, ticket }).await;
                return;
            }
            Event::Failed(msg) => {
                guard.finished = true;
                let _ = out.send(Piece::Failed(ServeError::Worker(msg))).await;
                return;
            }
        }
    }
}

fn ms_since(t: std::time::Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

/// What the client of a request has been sent, kept by the entry node as it relays the pieces of
/// the node that runs it: the ids of its tokens and the bytes of their text. When that node fails
/// or moves the request, the next one continues from here, so the client's stream has no gap and
/// no repeat.
#[derive(Default)]
pub struct ClientHas {
    tokens: Vec<u32>,
    text_bytes: u64,
}

impl ClientHas {
    /// A token whose text is on its way (ids beyond any context are not kept).
    pub fn token(&mut self, id: u32) {
        if self.tokens.len() < MAX_FORWARDED_TOKENS {
            self.tokens.push(id);
        }
    }

    /// Text on its way to the client.
    pub fn text(&mut self, text: &str) {
        self.text_bytes += text.len() as u64;
    }

    /// The tokens the client has.
    pub fn tokens(&self) -> usize {
        self.tokens.len()
    }

    /// Where another node continues the request, with the K/V parked there under `ticket` if it
    /// was moved; None to start afresh (nothing sent yet, nothing parked).
    pub fn resume(&self, ticket: Option<u64>) -> Option<InferResume> {
        (!self.tokens.is_empty() || ticket.is_some()).then(|| InferResume {
            tokens: self.tokens.clone(),
            text_bytes: self.text_bytes,
            ticket,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::{ClientHas, StopMatcher};

    #[test]
    fn stop_strings_cut_the_text_and_partial_matches_wait() {
        let mut m = StopMatcher { stops: vec!["\n\n".into(), "END".into()], pending: String::new() };
        assert_eq!(m.push("Hello"), ("Hello".into(), false));
        assert_eq!(m.push(" wor\n"), (" wor".into(), false), "a lone newline may start a stop");
        assert_eq!(m.push("ld E"), ("\nld ".into(), false));
        assert_eq!(m.push("ND tail"), (String::new(), true));
        let mut m = StopMatcher { stops: vec!["é!".into()], pending: String::new() };
        assert_eq!(m.push("café"), ("caf".into(), false));
        assert_eq!(m.flush(), "é");
    }

    #[test]
    fn what_the_client_has_is_where_another_node_continues() {
        let mut client = ClientHas::default();
        assert!(client.resume(None).is_none(), "nothing sent: a fresh start");
        let moved = client.resume(Some(7)).expect("K/V parked elsewhere");
        assert_eq!((moved.tokens.len(), moved.text_bytes, moved.ticket), (0, 0, Some(7)));
        client.token(5);
        client.text("é!");
        client.token(9);
        let r = client.resume(None).expect("resumed");
        assert_eq!((r.tokens, r.text_bytes, r.ticket), (vec![5, 9], 3, None));
        assert_eq!(client.tokens(), 2);
    }
}
