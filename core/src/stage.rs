//! A stage of a chain: sessions on an engine that holds a span of a model's layers, stepped by a
//! driver elsewhere (usually another node). Each session has at most one step queued (its driver
//! waits for the answer), and the steps of different sessions queued when the GPU comes free run
//! as one engine step: continuous batching across the requests in the pipeline, so a stage is
//! not idle while one request's step is at another stage.
//!
//! A session reserves K/V blocks for every position it may hold when it opens, so a step never
//! fails for want of blocks and a stranger cannot hold more than the sessions it could open.
//!
//! Where a chain is split into prefill and decode, a decode stage's session takes its prompt's
//! K/V from the prefill stage holding the same span (`import`), which reads it out of its own
//! session after each step (`export`). A session's id is unguessable: it is what a prefill stage
//! names to write into it.

use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::{BuildHasher, Hasher};

use crate::engine::{Engine, SamplingParams, StepInput, attention_chunks};
use crate::error::{Error, Result};
use crate::kv::{KvLayer, SeqId};

/// One step of a session.
#[derive(Clone, Debug, PartialEq)]
pub struct StageStep {
    /// The position of the first token: a step out of order is refused, never computed.
    pub start: usize,
    pub tokens: Vec<u32>,
    /// The residual stream entering the span, `[tokens][hidden]`; none at the first stage.
    pub hidden: Option<Vec<f32>>,
    /// Sample after the last token (the last stage only).
    pub sample: Option<SamplingParams>,
}

/// What a step gives back.
#[derive(Clone, Debug, PartialEq)]
pub enum StageOut {
    /// The residual stream after the span, `[tokens][hidden]`: for the next stage.
    Hidden(Vec<f32>),
    /// The sampled token, where the step sampled (the last stage).
    Token(Option<u32>),
}

/// Where a step's answer goes (called on the GPU thread).
pub type StageReply = Box<dyn FnOnce(Result<StageOut>) + Send>;

/// One session: its sequence, and the positions it reserved (imports stay within them).
struct Session {
    seq: SeqId,
    positions: usize,
}

/// The sessions of a stage and their queued steps.
#[derive(Default)]
pub struct Stages {
    sessions: HashMap<u64, Session>,
    queue: VecDeque<(u64, StageStep, StageReply)>,
    next: u64,
    /// Keys the session ids: random per process, so ids cannot be guessed from one another.
    ids: std::collections::hash_map::RandomState,
}

impl Stages {
    pub fn sessions(&self) -> usize {
        self.sessions.len()
    }

    pub fn has_work(&self) -> bool {
        !self.queue.is_empty()
    }

    /// Opens a session that may hold up to `positions` positions, reserving their blocks.
    pub fn open(&mut self, engine: &mut Engine, positions: usize) -> Result<u64> {
        let seq = engine.create_sequence();
        if let Err(e) = engine.reserve_sequence(seq, positions) {
            engine.free_sequence(seq);
            return Err(e);
        }
        let id = loop {
            self.next += 1;
            let mut h = self.ids.build_hasher();
            h.write_u64(self.next);
            let id = h.finish();
            if id != 0 && !self.sessions.contains_key(&id) {
                break id;
            }
        };
        self.sessions.insert(id, Session { seq, positions });
        Ok(id)
    }

    /// Ends a session and frees its blocks; a step of it still queued is answered with an error.
    pub fn close(&mut self, engine: &mut Engine, session: u64) {
        if let Some(s) = self.sessions.remove(&session) {
            engine.free_sequence(s.seq);
        }
    }

    fn session(&self, session: u64) -> Result<&Session> {
        self.sessions.get(&session).ok_or_else(|| Error::InvalidRequest(format!("no stage session {session} (closed or never opened)")))
    }

    /// Writes one layer of K/V computed elsewhere (a prefill stage of the same span) into a
    /// session, within the positions it reserved.
    pub fn import(&mut self, engine: &mut Engine, session: u64, kv: &KvLayer) -> Result<()> {
        let s = self.session(session)?;
        if kv.start + kv.tokens > s.positions {
            return Err(Error::KvImport(format!(
                "positions {}..{} beyond the {} stage session {session} reserved",
                kv.start,
                kv.start + kv.tokens,
                s.positions
            )));
        }
        engine.import_kv(s.seq, kv)
    }

    /// The K/V of positions `start..end` of a session, every layer of the span.
    pub fn export(&mut self, engine: &mut Engine, session: u64, start: usize, end: usize) -> Result<Vec<KvLayer>> {
        let seq = self.session(session)?.seq;
        engine.export_kv(seq, start, end)
    }

    /// Positions a session holds in every layer.
    pub fn held(&self, engine: &Engine, session: u64) -> Result<usize> {
        engine.sequence_len(self.session(session)?.seq)
    }

    /// Queues a step; a second step of a session before the first is answered is refused.
    pub fn queue(&mut self, session: u64, step: StageStep, reply: StageReply) {
        if self.queue.iter().any(|(s, _, _)| *s == session) {
            reply(Err(Error::InvalidRequest(format!("stage session {session} already has a step queued"))));
            return;
        }
        self.queue.push_back((session, step, reply));
    }

    /// Runs the queued steps that fit in one engine step, oldest first, and answers them;
    /// returns how many sessions and tokens the step held (none when nothing ran).
    pub fn run(&mut self, engine: &mut Engine) -> (usize, usize) {
        let width = engine.config.hidden_size;
        let first_stage = engine.span().start == 0;
        let mut batch: Vec<(SeqId, StageStep, StageReply)> = Vec::new();
        let (mut tokens, mut chunks) = (0, 0);
        let mut in_batch = HashSet::new();
        let mut later = VecDeque::new();
        while let Some((session, step, reply)) = self.queue.pop_front() {
            let Some(seq) = self.sessions.get(&session).map(|s| s.seq) else {
                reply(Err(Error::InvalidRequest(format!("no stage session {session} (closed or never opened)"))));
                continue;
            };
            if let Err(e) = check(engine, seq, &step, width, first_stage) {
                reply(Err(e));
                continue;
            }
            let n = step.tokens.len();
            let c = attention_chunks(step.start, n);
            if n > engine.max_batch_tokens() || c > engine.attention_budget() {
                reply(Err(Error::InvalidRequest(format!(
                    "a step of {n} tokens from position {} exceeds this stage's step budget of {} tokens",
                    step.start,
                    engine.max_batch_tokens()
                ))));
                continue;
            }
            if !in_batch.insert(seq) || tokens + n > engine.max_batch_tokens() || chunks + c > engine.attention_budget() {
                later.push_back((session, step, reply));
                continue;
            }
            tokens += n;
            chunks += c;
            batch.push((seq, step, reply));
        }
        self.queue = later;
        if batch.is_empty() {
            return (0, 0);
        }
        let ran = (batch.len(), tokens);
        let inputs: Vec<StepInput> =
            batch.iter().map(|(seq, step, _)| StepInput { seq: *seq, tokens: step.tokens.clone(), sample: step.sample }).collect();
        let hidden: Option<Vec<f32>> =
            (!first_stage).then(|| batch.iter().flat_map(|(_, step, _)| step.hidden.iter().flatten().copied()).collect());
        match engine.step_span(&inputs, hidden.as_deref()) {
            Ok(out) => {
                let mut rows = out.hidden.unwrap_or_default().into_iter();
                for (i, (_, step, reply)) in batch.into_iter().enumerate() {
                    if engine.holds_head() {
                        reply(Ok(StageOut::Token(out.tokens.get(i).copied().flatten())));
                    } else {
                        reply(Ok(StageOut::Hidden(rows.by_ref().take(step.tokens.len() * width).collect())));
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, steps = inputs.len(), "stage step failed");
                let msg = e.to_string();
                for (_, _, reply) in batch {
                    reply(Err(Error::InvalidRequest(format!("stage step failed: {msg}"))));
                }
            }
        }
        ran
    }
}

/// What one step must be to join a batch: in order, with hidden states where the span needs
/// them, of the right width, sampling only at the last stage.
fn check(engine: &Engine, seq: SeqId, step: &StageStep, width: usize, first_stage: bool) -> Result<()> {
    let len = engine.sequence_len(seq)?;
    if step.start != len {
        return Err(Error::InvalidRequest(format!("a step from position {} for a session holding {len}", step.start)));
    }
    if step.tokens.is_empty() {
        return Err(Error::InvalidRequest("a stage step needs at least one token".into()));
    }
    match (&step.hidden, first_stage) {
        (Some(_), true) => return Err(Error::InvalidRequest("the first stage embeds its tokens: it takes no hidden states".into())),
        (None, false) => {
            let start = engine.span().start;
            return Err(Error::InvalidRequest(format!("the stage starting at layer {start} needs the hidden states before it")));
        }
        (Some(h), false) if h.len() != step.tokens.len() * width => {
            return Err(Error::InvalidRequest(format!("{} hidden values for {} tokens of width {width}", h.len(), step.tokens.len())));
        }
        _ => {}
    }
    if step.sample.is_some() && !engine.holds_head() {
        return Err(Error::InvalidRequest("only the last stage samples".into()));
    }
    Ok(())
}
