//! Continuous batching on one engine: which sequences' tokens go into each step.
//!
//! Every request is a token list (prompt, then what it generated) and a count of positions whose
//! K/V is in the cache; what is left to compute is a prefill when it is more than one token
//! (a new prompt, or a preempted request's prompt plus output) and a decode when it is one. Each
//! step takes decode tokens and prefill chunks within a token budget and the engine's attention
//! budget (Orca's iteration-level scheduling with Sarathi's chunked prefill); requests join and
//! leave between steps. New requests start from the longest cached prefix of their prompt. When
//! the cache runs out of blocks the newest running request is preempted: its blocks are freed
//! (full ones stay cached) and it is recomputed later.
//!
//! While every running request is decoding and nothing waits, the next step is submitted before
//! the last one is read, its tokens taken on the GPU from the samples before (`FROM_SAMPLED`):
//! the CPU records step N + 1 while the GPU runs step N, as `Engine::decode_run` does for one
//! sequence. A request that stops on a token has had one more position computed, which its
//! release drops; any other change (a new request, a cancellation, an import) settles the step
//! in flight first.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use std::collections::HashMap;

use crate::engine::{Engine, PendingStep, SamplingParams, StepInput};
use crate::error::{Error, Result};
use crate::kv::{BLOCK_TOKENS, KvLayer, SeqId};

/// The order in which work claims a step's budget.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Policy {
    /// Oldest request first, for decodes and prefill chunks alike.
    #[default]
    Fcfs,
    /// Every running decode first, then prefill chunks oldest first: a long prompt never delays
    /// a token of a running request.
    DecodeFirst,
    /// Every running decode first, then the prefill with the fewest tokens left.
    ShortestPromptFirst,
}

impl std::str::FromStr for Policy {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "fcfs" => Ok(Policy::Fcfs),
            "decode-first" => Ok(Policy::DecodeFirst),
            "shortest-prompt-first" => Ok(Policy::ShortestPromptFirst),
            other => Err(format!("unknown policy `{other}` (fcfs, decode-first, shortest-prompt-first)")),
        }
    }
}

/// How a scheduler fills its steps.
#[derive(Clone, Debug)]
pub struct SchedulerConfig {
    pub policy: Policy,
    /// Split prompts into chunks fused with the decode tokens of the same step. Without it a
    /// step runs prefills alone, whole prompts at a time, and decodes wait (the classic baseline).
    pub chunked_prefill: bool,
    /// Requests that may wait for admission before new ones are refused.
    pub max_waiting: usize,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig { policy: Policy::Fcfs, chunked_prefill: true, max_waiting: 256 }
    }
}

/// What one request asks for.
#[derive(Clone, Debug)]
pub struct Request {
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// Generation ends after any of these tokens (which is delivered).
    pub stop_ids: Vec<u32>,
    /// Tokens this request already generated elsewhere (a resumed or migrated request): they
    /// follow the prompt, count toward `max_tokens` and are not delivered again.
    pub resumed: Vec<u32>,
}

/// How a request's KV comes to be.
pub enum Start {
    /// Computed here (after whatever prefix is cached).
    Compute,
    /// Computed here, and every layer's K/V of positions from `from` on is handed to `sink` as
    /// it is written: a prefill node's request for a decode node that holds the first `from`.
    Export { sink: Box<dyn KvExport>, from: usize },
    /// Imported already into the parked sequence `ticket` (every position but the last token's);
    /// a ticket that is gone or incomplete falls back to computing.
    Parked(u64),
}

/// Where an exported request's layers go, in layer order per step.
pub trait KvExport: Send {
    /// False when the receiver is gone (the request is then cancelled).
    fn layer(&mut self, kv: KvLayer) -> bool;
}

/// Why a request ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// `max_tokens` reached.
    Length,
    /// A stop token was generated.
    Stop,
    /// The receiver went away or the request was cancelled.
    Cancelled,
}

/// Timings of a finished request.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct RequestTimings {
    pub prompt_tokens: usize,
    /// Prompt tokens found in the prefix cache at admission.
    pub cached_tokens: usize,
    pub generated_tokens: usize,
    pub queued: Duration,
    /// Arrival to first token.
    pub ttft: Option<Duration>,
    /// Arrival to the end.
    pub e2e: Duration,
    /// Mean time between tokens after the first.
    pub tpot: Option<Duration>,
    pub preemptions: usize,
}

/// What a request's receiver is told.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    Token(u32),
    Finished(FinishReason, RequestTimings),
    /// Never started: the queue was full (`overloaded`) or the request can never run here.
    Refused {
        overloaded: bool,
        reason: String,
    },
    /// The engine failed while running it.
    Failed(String),
    /// Taken off this scheduler to continue elsewhere (a draining node): every token so far
    /// (prompt, then generated) and the K/V of all but the last, every layer (empty when the
    /// request had not started).
    Detached {
        tokens: Vec<u32>,
        kv: Vec<KvLayer>,
    },
}

/// Where a request's events go.
pub trait EventSink: Send {
    /// Delivers one event; false when the receiver is gone (the request is then cancelled).
    fn send(&mut self, event: Event) -> bool;
    /// Whether the receiver is gone, checked between steps so a request whose client left
    /// during a long prefill frees its blocks without waiting for a token.
    fn is_closed(&self) -> bool;
}

impl EventSink for std::sync::mpsc::Sender<Event> {
    fn send(&mut self, event: Event) -> bool {
        std::sync::mpsc::Sender::send(self, event).is_ok()
    }
    fn is_closed(&self) -> bool {
        false
    }
}

/// What a request must fit in to ever run on a scheduler; checked where it is submitted, and
/// again by the scheduler itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub context_length: usize,
    pub vocab_size: usize,
    pub kv_blocks: usize,
    /// The most blocks a sequence holds at once where the cache gives back blocks before every
    /// layer's sliding window (`Engine::window_blocks`).
    pub window_blocks: Option<usize>,
    /// Requests that may wait for admission before new ones are refused.
    pub max_waiting: usize,
}

impl Limits {
    /// Whether `req` could ever run (the queue length is not checked here).
    pub fn check(&self, req: &Request) -> Result<()> {
        if req.prompt.is_empty() {
            return Err(Error::InvalidRequest("the prompt is empty".into()));
        }
        if let Some(&id) = req.prompt.iter().chain(&req.resumed).find(|&&id| id as usize >= self.vocab_size) {
            return Err(Error::TokenOutOfRange { id, vocab: self.vocab_size });
        }
        if req.resumed.len() >= req.max_tokens {
            return Err(Error::InvalidRequest(format!("{} tokens resumed of at most {}", req.resumed.len(), req.max_tokens)));
        }
        let positions = req.prompt.len() + req.max_tokens;
        if positions > self.context_length {
            return Err(Error::ContextOverflow { tokens: req.prompt.len(), max_new: req.max_tokens, context: self.context_length });
        }
        let blocks = positions.div_ceil(BLOCK_TOKENS);
        let blocks = self.window_blocks.map_or(blocks, |w| blocks.min(w));
        if blocks > self.kv_blocks {
            return Err(Error::InvalidRequest(format!(
                "the request needs {blocks} KV blocks of {BLOCK_TOKENS} tokens and the cache holds {} (raise --kv-memory)",
                self.kv_blocks
            )));
        }
        Ok(())
    }
}

/// Identifies a request within one scheduler.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RequestId(pub u64);

struct Active {
    id: RequestId,
    req: Request,
    sink: Box<dyn EventSink>,
    /// Prompt then generated tokens.
    tokens: Vec<u32>,
    /// Positions of `tokens` with K/V in the cache.
    computed: usize,
    seq: Option<SeqId>,
    arrival: Instant,
    admitted: Option<Instant>,
    first_token: Option<Instant>,
    cached_tokens: usize,
    preemptions: usize,
    export: Option<Export>,
}

struct Export {
    sink: Box<dyn KvExport>,
    /// Positions before this one are not sent (the receiver has them, or they went already).
    from: usize,
    /// The receiver went away.
    lost: bool,
}

/// A sequence whose K/V arrives from another node before its request does.
struct Parked {
    seq: SeqId,
    /// The tokens behind the positions being imported.
    tokens: Vec<u32>,
    /// Positions found in this node's prefix cache (not imported).
    held: usize,
    since: Instant,
}

/// How long imported K/V waits for its next layer, or for its request once complete.
pub const PARK_TIMEOUT: Duration = Duration::from_secs(30);

impl Active {
    fn generated(&self) -> usize {
        self.tokens.len() - self.req.prompt.len()
    }
    fn left(&self) -> usize {
        self.tokens.len() - self.computed
    }
}

/// Counters and gauges of a scheduler, for metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct SchedulerStats {
    pub running: usize,
    pub waiting: usize,
    /// Prompt tokens still to prefill, over running and waiting requests.
    pub queued_prefill_tokens: usize,
    pub kv_blocks_used: usize,
    pub kv_blocks_cached: usize,
    pub kv_blocks_total: usize,
    pub steps: u64,
    pub prompt_tokens: u64,
    pub prefix_cache_hit_tokens: u64,
    pub generated_tokens: u64,
    pub preemptions: u64,
    pub finished: u64,
    /// Prompt positions (and a resumed request's tokens) computed here in prefill chunks.
    pub prefill_computed_tokens: u64,
    /// Positions whose K/V came from another node instead of being computed here.
    pub imported_tokens: u64,
    /// Positions whose K/V was computed here and sent to another node.
    pub exported_tokens: u64,
    /// Requests handed to another node (drain).
    pub detached: u64,
    pub parked: usize,
    /// Engine steps run for chains' stage sessions (`crate::stage`), the session-steps and
    /// tokens they held (their ratio is the batching across requests), and the microseconds
    /// the GPU worker spent on them (against wall time: a stage's share idle in bubbles).
    pub stage_steps: u64,
    pub stage_session_steps: u64,
    pub stage_tokens: u64,
    pub stage_busy_us: u64,
}

/// Continuous batching over one engine.
pub struct Scheduler {
    engine: Engine,
    cfg: SchedulerConfig,
    waiting: VecDeque<Active>,
    /// Admitted requests, oldest first.
    running: Vec<Active>,
    parked: HashMap<u64, Parked>,
    next_ticket: u64,
    stats: SchedulerStats,
    /// The step submitted ahead of the one being read, where decoding runs back to back.
    ahead: Option<InFlight>,
}

/// A submitted step and its rows: each request's id and its tokens in the step.
struct InFlight {
    step: PendingStep,
    rows: Vec<(RequestId, usize)>,
}

/// What planning a step did.
enum Planned {
    Nothing,
    /// Ran and delivered (an exporting step, or one the engine refused).
    Ran,
    Submitted(InFlight),
}

impl Scheduler {
    pub fn new(engine: Engine, cfg: SchedulerConfig) -> Self {
        let mut s = Scheduler {
            engine,
            cfg,
            waiting: VecDeque::new(),
            running: Vec::new(),
            parked: HashMap::new(),
            next_ticket: 1,
            stats: SchedulerStats::default(),
            ahead: None,
        };
        s.refresh_gauges();
        s
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The engine, for work beside the scheduler's own requests (a chain's stage sessions).
    pub fn engine_mut(&mut self) -> &mut Engine {
        &mut self.engine
    }

    /// Counts a stage step run on the engine beside the scheduler (`crate::stage`).
    pub fn count_stage_step(&mut self, sessions: usize, tokens: usize, busy: std::time::Duration) {
        self.stats.stage_steps += 1;
        self.stats.stage_session_steps += sessions as u64;
        self.stats.stage_tokens += tokens as u64;
        self.stats.stage_busy_us += busy.as_micros() as u64;
    }

    pub fn stats(&self) -> SchedulerStats {
        self.stats
    }

    /// Whether any request is waiting or running.
    pub fn has_work(&self) -> bool {
        !self.waiting.is_empty() || !self.running.is_empty() || self.ahead.is_some()
    }

    /// What a request must fit in to ever run here.
    pub fn limits(&self) -> Limits {
        Limits {
            context_length: self.engine.context_length(),
            vocab_size: self.engine.config.vocab_size,
            kv_blocks: self.engine.kv_usage().total,
            window_blocks: self.engine.window_blocks(),
            max_waiting: self.cfg.max_waiting,
        }
    }

    /// Queues a request; its events go to `sink`. Ids must increase with arrival (they order
    /// the queue); a refused request is told why through `sink` as well.
    pub fn submit(&mut self, id: RequestId, req: Request, sink: Box<dyn EventSink>) -> Result<RequestId> {
        self.submit_with(id, req, sink, Start::Compute)
    }

    /// `submit`, with the request's K/V exported as it is computed or imported already.
    pub fn submit_with(&mut self, id: RequestId, req: Request, mut sink: Box<dyn EventSink>, start: Start) -> Result<RequestId> {
        self.settle();
        let checked = match self.limits().check(&req) {
            Ok(()) if !self.engine.holds_all() => {
                let span = self.engine.span();
                Err(Error::InvalidRequest(format!(
                    "this node holds layers {}..{} only: it runs stages of chains, not whole requests",
                    span.start, span.end
                )))
            }
            Ok(()) if self.waiting.len() >= self.cfg.max_waiting => Err(Error::Overloaded { waiting: self.waiting.len() }),
            other => other,
        };
        if let Err(e) = checked {
            if let Start::Parked(ticket) = start {
                self.discard(ticket);
            }
            sink.send(Event::Refused { overloaded: matches!(e, Error::Overloaded { .. }), reason: e.to_string() });
            return Err(e);
        }
        self.stats.prompt_tokens += req.prompt.len() as u64;
        let mut tokens = req.prompt.clone();
        tokens.extend_from_slice(&req.resumed);
        let now = Instant::now();
        let mut a = Active {
            id,
            req,
            sink,
            tokens,
            computed: 0,
            seq: None,
            arrival: now,
            admitted: None,
            // A resumed request's first token came long ago; its TPOT counts from here.
            first_token: None,
            cached_tokens: 0,
            preemptions: 0,
            export: None,
        };
        if !a.req.resumed.is_empty() {
            // Its first token came before (elsewhere): its TPOT counts from here, and its TTFT
            // is not this scheduler's to measure.
            a.first_token = Some(now);
        }
        match start {
            Start::Compute => {}
            Start::Export { sink, from } => a.export = Some(Export { sink, from, lost: false }),
            Start::Parked(ticket) => {
                if let Some((seq, held)) = self.unpark(ticket, &a.tokens) {
                    a.seq = Some(seq);
                    a.computed = a.tokens.len() - 1;
                    a.admitted = Some(now);
                    a.cached_tokens = held;
                    self.stats.imported_tokens += (a.computed - held) as u64;
                    self.stats.prefix_cache_hit_tokens += held as u64;
                    let at = self.running.partition_point(|r| r.id < a.id);
                    self.running.insert(at, a);
                    self.refresh_gauges();
                    return Ok(id);
                }
            }
        }
        self.waiting.push_back(a);
        self.refresh_gauges();
        Ok(id)
    }

    /// A new parked sequence for the K/V of `tokens` (to arrive through `import`), holding its
    /// longest cached prefix and blocks for every position plus one: its ticket and the positions
    /// it already holds (the sender may skip them).
    pub fn park(&mut self, tokens: Vec<u32>) -> Result<(u64, usize)> {
        self.expire_parked();
        if tokens.is_empty() {
            return Err(Error::InvalidRequest("nothing to park".into()));
        }
        let (seq, cached) = self.engine.create_sequence_with_prefix(&tokens);
        if let Err(e) = self.engine.reserve_sequence(seq, tokens.len() + 1) {
            self.engine.free_sequence(seq);
            return Err(e);
        }
        let ticket = self.next_ticket;
        self.next_ticket += 1;
        self.parked.insert(ticket, Parked { seq, tokens, held: cached, since: Instant::now() });
        self.refresh_gauges();
        Ok((ticket, cached))
    }

    /// Writes one layer's K/V into a parked sequence. A bad layer frees the sequence at once
    /// (nothing of it stays in the cache) and fails every later import and the request.
    pub fn import(&mut self, ticket: u64, kv: &KvLayer) -> Result<()> {
        let Some(p) = self.parked.get_mut(&ticket) else {
            return Err(Error::KvImport(format!("no parked sequence {ticket} (expired or failed)")));
        };
        if kv.start + kv.tokens > p.tokens.len() {
            let e = Error::KvImport(format!("positions {}..{} beyond the {} parked", kv.start, kv.start + kv.tokens, p.tokens.len()));
            self.discard(ticket);
            return Err(e);
        }
        // The timeout counts from the last layer received: a long prefill keeps its sequence.
        p.since = Instant::now();
        let r = self.engine.import_kv(p.seq, kv);
        if r.is_err() {
            self.discard(ticket);
        }
        r
    }

    /// Frees a parked sequence.
    pub fn discard(&mut self, ticket: u64) {
        if let Some(p) = self.parked.remove(&ticket) {
            self.engine.free_sequence(p.seq);
        }
        self.refresh_gauges();
    }

    /// Frees parked sequences nobody claimed in time.
    pub fn expire_parked(&mut self) -> usize {
        let old: Vec<u64> = self.parked.iter().filter(|(_, p)| p.since.elapsed() > PARK_TIMEOUT).map(|(&t, _)| t).collect();
        for &t in &old {
            tracing::warn!(ticket = t, "imported KV not claimed in time: freed");
            self.discard(t);
        }
        old.len()
    }

    /// Parked sequences waiting for their request.
    pub fn parked(&self) -> usize {
        self.parked.len()
    }

    /// The parked sequence of `ticket` (and the positions it held before the import) if it holds
    /// exactly the K/V of `tokens` but the last. A ticket for other tokens is left alone: it may
    /// be another request's.
    fn unpark(&mut self, ticket: u64, tokens: &[u32]) -> Option<(SeqId, usize)> {
        let want = tokens.len() - 1;
        let p = self.parked.get(&ticket)?;
        if p.tokens != tokens[..want] {
            tracing::warn!(ticket, "a resumed request named K/V parked for other tokens: computing instead");
            return None;
        }
        let p = self.parked.remove(&ticket)?;
        let complete = self.engine.sequence_len(p.seq).is_ok_and(|l| l == want);
        if !complete || self.engine.adopt_tokens(p.seq, &tokens[..want]).is_err() {
            tracing::warn!(ticket, "imported KV incomplete: computing instead");
            self.engine.free_sequence(p.seq);
            return None;
        }
        Some((p.seq, p.held))
    }

    /// Whether a parked sequence holds every position it was parked for; keeps it alive.
    pub fn seal(&mut self, ticket: u64) -> Result<()> {
        let p = self.parked.get_mut(&ticket).ok_or_else(|| Error::KvImport(format!("no parked sequence {ticket} (expired or failed)")))?;
        p.since = Instant::now();
        let len = self.engine.sequence_len(p.seq)?;
        if len != p.tokens.len() {
            return Err(Error::KvImport(format!("{len} of {} positions arrived", p.tokens.len())));
        }
        Ok(())
    }

    /// Keeps a parked sequence from expiring (its sender is alive but slow).
    pub fn touch(&mut self, ticket: u64) {
        if let Some(p) = self.parked.get_mut(&ticket) {
            p.since = Instant::now();
        }
    }

    /// Takes every request off this scheduler: each is told `Detached` with its tokens and, when
    /// it had started, its K/V, to continue on another node.
    pub fn detach_all(&mut self) {
        self.settle();
        // A prefill for another node's decode stays: it is this node's work whatever its role.
        let (keep, running): (Vec<Active>, Vec<Active>) = std::mem::take(&mut self.running).into_iter().partition(|a| a.export.is_some());
        self.running = keep;
        let (keep, waiting): (VecDeque<Active>, VecDeque<Active>) =
            std::mem::take(&mut self.waiting).into_iter().partition(|a| a.export.is_some());
        self.waiting = keep;
        for mut a in running {
            // Only a decoding request's K/V is worth moving: mid-prefill it is recomputed.
            let kv = match a.seq {
                Some(seq) if a.computed + 1 == a.tokens.len() => self.engine.export_kv(seq, 0, a.computed).unwrap_or_else(|e| {
                    tracing::warn!(error = %e, "cannot read a detached request's KV: it will be recomputed");
                    Vec::new()
                }),
                _ => Vec::new(),
            };
            let tokens = a.tokens.clone();
            self.release(&mut a);
            self.stats.detached += 1;
            a.sink.send(Event::Detached { tokens, kv });
        }
        for mut a in waiting {
            self.release(&mut a);
            self.stats.detached += 1;
            let tokens = std::mem::take(&mut a.tokens);
            a.sink.send(Event::Detached { tokens, kv: Vec::new() });
        }
        self.refresh_gauges();
    }

    /// Cancels every request.
    pub fn cancel_all(&mut self) {
        let ids: Vec<RequestId> = self.running.iter().chain(self.waiting.iter()).map(|a| a.id).collect();
        for id in ids {
            self.cancel(id);
        }
    }

    /// Ends a request early; its blocks are freed at once.
    pub fn cancel(&mut self, id: RequestId) {
        self.settle();
        if let Some(i) = self.waiting.iter().position(|a| a.id == id) {
            if let Some(a) = self.waiting.remove(i) {
                self.finish(a, FinishReason::Cancelled);
            }
        } else if let Some(i) = self.running.iter().position(|a| a.id == id) {
            let a = self.running.remove(i);
            self.finish(a, FinishReason::Cancelled);
        }
        self.refresh_gauges();
    }

    /// Runs one step, if there is work. Returns whether a step ran.
    pub fn step(&mut self) -> Result<bool> {
        let current = match self.ahead.take() {
            Some(ahead) => ahead,
            None => match self.submit_planned()? {
                Planned::Submitted(current) => current,
                Planned::Ran => return Ok(true),
                Planned::Nothing => return Ok(false),
            },
        };
        self.ahead = self.chain(&current);
        let result = self.engine.finish_step(current.step);
        self.deliver(&current.rows, result);
        Ok(true)
    }

    /// Reads the step in flight, if any, and delivers its tokens, submitting nothing after it.
    pub fn settle(&mut self) {
        if let Some(ahead) = self.ahead.take() {
            let result = self.engine.finish_step(ahead.step);
            self.deliver(&ahead.rows, result);
        }
    }

    /// Plans and submits a step. An exporting step runs to the end here (its layers leave as
    /// the GPU writes them) and is delivered, as is a step the engine refused.
    fn submit_planned(&mut self) -> Result<Planned> {
        self.drop_closed();
        let plan = self.plan()?;
        if plan.is_empty() {
            self.refresh_gauges();
            return Ok(Planned::Nothing);
        }
        let plan: Vec<(usize, usize)> = plan.into_iter().filter_map(|(id, n)| self.index(id).map(|i| (i, n))).collect();
        let inputs: Vec<StepInput> = plan
            .iter()
            .map(|&(i, n)| {
                let a = &self.running[i];
                let seq = a.seq.unwrap_or(SeqId(u64::MAX));
                let sample = (a.computed + n == a.tokens.len()).then_some(a.req.sampling);
                StepInput { seq, tokens: a.tokens[a.computed..a.computed + n].to_vec(), sample }
            })
            .collect();
        let rows: Vec<(RequestId, usize)> = plan.iter().map(|&(i, n)| (self.running[i].id, n)).collect();
        let exporting: Vec<SeqId> =
            plan.iter().filter(|&&(i, _)| self.running[i].export.is_some()).filter_map(|&(i, _)| self.running[i].seq).collect();
        if exporting.is_empty() {
            return match self.engine.submit_step(&inputs) {
                Ok(step) => {
                    self.count_computed(&rows);
                    Ok(Planned::Submitted(InFlight { step, rows }))
                }
                Err(e) => {
                    self.deliver(&rows, Err(e));
                    Ok(Planned::Ran)
                }
            };
        }
        self.send_cached_prefixes(&plan);
        let Scheduler { engine, running, .. } = self;
        let mut route = |seq: SeqId, kv: KvLayer| -> Result<()> {
            let Some(a) = running.iter_mut().find(|a| a.seq == Some(seq)) else { return Ok(()) };
            let Some(x) = a.export.as_mut() else { return Ok(()) };
            if let Some(kv) = trim_front(kv, x.from) {
                // A receiver that is gone ends the request before the next step (`drop_closed`).
                x.lost = x.lost || !x.sink.layer(kv);
            }
            Ok(())
        };
        let result = engine.step_exporting(&inputs, &exporting, &mut route);
        if result.is_ok() {
            self.count_computed(&rows);
        }
        self.deliver(&rows, result);
        Ok(Planned::Ran)
    }

    /// Counts a submitted step's positions as computed, and what it exported.
    fn count_computed(&mut self, rows: &[(RequestId, usize)]) {
        for &(id, n) in rows {
            let Some(i) = self.index(id) else { continue };
            let a = &mut self.running[i];
            let decode = n == 1 && a.computed + 1 == a.tokens.len();
            if !decode {
                self.stats.prefill_computed_tokens += n as u64;
            }
            a.computed += n;
            if let Some(x) = a.export.as_mut()
                && a.computed > x.from
            {
                self.stats.exported_tokens += (a.computed - x.from) as u64;
                x.from = a.computed;
            }
        }
    }

    /// Submits the decode step after `current` before `current` is read, each token the one
    /// `current` sampled for its request, where that is the whole next step: nothing waits, every
    /// running request sampled in `current`, none exports, and the engine has room. Requests
    /// that reach their length limit with `current`'s token are left out.
    fn chain(&mut self, current: &InFlight) -> Option<InFlight> {
        if !self.waiting.is_empty() || current.rows.len() != self.running.len() {
            return None;
        }
        let mut inputs = Vec::new();
        let mut rows = Vec::new();
        for (row, &(id, _)) in current.rows.iter().enumerate() {
            let a = &self.running[self.index(id)?];
            // A row that did not sample (a prefill chunk) gives the next step nothing to take.
            if a.computed != a.tokens.len() || a.export.is_some() || a.sink.is_closed() {
                return None;
            }
            if a.generated() + 1 < a.req.max_tokens {
                let token = tandem_shaders::FROM_SAMPLED | row as u32;
                inputs.push(StepInput { seq: a.seq?, tokens: vec![token], sample: Some(a.req.sampling) });
                rows.push((id, 1));
            }
        }
        if inputs.is_empty() {
            return None;
        }
        // A step the engine refuses (no blocks left, the context's end) is planned after this one.
        let step = self.engine.submit_step(&inputs).ok()?;
        for &(id, _) in &rows {
            if let Some(i) = self.index(id) {
                self.running[i].computed += 1;
            }
        }
        Some(InFlight { step, rows })
    }

    /// Hands a finished step's tokens to its requests and ends those that are done; a failed
    /// step fails its requests, not the server.
    fn deliver(&mut self, rows: &[(RequestId, usize)], result: Result<Vec<Option<u32>>>) {
        let sampled = match result {
            Ok(s) => s,
            Err(e) => {
                let msg = e.to_string();
                tracing::error!(error = %msg, "engine step failed");
                for &(id, _) in rows {
                    let Some(i) = self.index(id) else { continue };
                    let mut a = self.running.remove(i);
                    a.sink.send(Event::Failed(msg.clone()));
                    self.release(&mut a);
                }
                // A step chained on the failed one fails with it.
                if let Some(ahead) = self.ahead.take() {
                    let _ = self.engine.finish_step(ahead.step);
                    self.deliver(&ahead.rows, Err(e));
                }
                self.refresh_gauges();
                return;
            }
        };
        self.stats.steps += 1;
        let now = Instant::now();
        let mut done = Vec::new();
        for (&(id, _), token) in rows.iter().zip(sampled) {
            // A request that ended after a step was chained on it has a row there still.
            let (Some(i), Some(token)) = (self.index(id), token) else { continue };
            let a = &mut self.running[i];
            a.tokens.push(token);
            a.first_token.get_or_insert(now);
            self.stats.generated_tokens += 1;
            let reason = if !a.sink.send(Event::Token(token)) {
                Some(FinishReason::Cancelled)
            } else if a.req.stop_ids.contains(&token) {
                Some(FinishReason::Stop)
            } else if a.generated() >= a.req.max_tokens {
                Some(FinishReason::Length)
            } else {
                None
            };
            if let Some(r) = reason {
                done.push((id, r));
            }
        }
        for (id, reason) in done {
            if let Some(i) = self.index(id) {
                let a = self.running.remove(i);
                self.finish(a, reason);
            }
        }
        self.refresh_gauges();
    }

    /// Sends an exporting request's cached positions the receiver lacks, before its first step
    /// computes the rest.
    fn send_cached_prefixes(&mut self, plan: &[(usize, usize)]) {
        for &(i, _) in plan {
            let a = &mut self.running[i];
            let (Some(seq), Some(x)) = (a.seq, a.export.as_mut()) else { continue };
            if a.computed <= x.from {
                continue;
            }
            match self.engine.export_kv(seq, x.from, a.computed) {
                Ok(layers) => {
                    self.stats.exported_tokens += (a.computed - x.from) as u64;
                    x.from = a.computed;
                    x.lost = !layers.into_iter().all(|kv| x.sink.layer(kv));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read a cached prefix for export");
                    x.lost = true;
                }
            }
        }
    }

    fn drop_closed(&mut self) {
        // An exporting request whose receiver left has nothing left to do.
        let lost_export = |a: &Active| a.export.as_ref().is_some_and(|x| x.lost);
        let closed: Vec<RequestId> =
            self.running.iter().chain(self.waiting.iter()).filter(|a| a.sink.is_closed() || lost_export(a)).map(|a| a.id).collect();
        for id in closed {
            self.cancel(id);
        }
    }

    fn index(&self, id: RequestId) -> Option<usize> {
        self.running.binary_search_by_key(&id, |a| a.id).ok()
    }

    fn free_blocks(&self) -> usize {
        let u = self.engine.kv_usage();
        u.total - u.used
    }

    /// Chooses (request, tokens) for the next step, admitting and preempting as needed.
    fn plan(&mut self) -> Result<Vec<(RequestId, usize)>> {
        let prefill_only = !self.cfg.chunked_prefill && (self.running.iter().any(|a| a.left() > 1) || !self.waiting.is_empty());
        let plan = self.plan_with(prefill_only)?;
        if plan.is_empty() && prefill_only {
            // No prefill can start (the decoding requests hold the blocks it needs): decode.
            return self.plan_with(false);
        }
        Ok(plan)
    }

    fn plan_with(&mut self, prefill_only: bool) -> Result<Vec<(RequestId, usize)>> {
        let mut tokens_left = self.engine.max_batch_tokens();
        let mut chunks_left = self.engine.attention_budget();
        let mut plan: Vec<(RequestId, usize)> = Vec::new();
        let mut blocks_taken = 0;

        // Running requests in policy order.
        let mut order: Vec<RequestId> = self.running.iter().map(|a| a.id).collect();
        let key = |a: &Active| (a.left() > 1, a.id);
        match self.cfg.policy {
            Policy::Fcfs => {}
            Policy::DecodeFirst => order.sort_by_key(|&id| self.index(id).map(|i| key(&self.running[i]))),
            Policy::ShortestPromptFirst => order.sort_by_key(|&id| {
                self.index(id).map(|i| {
                    let a = &self.running[i];
                    (a.left() > 1, a.left(), a.id)
                })
            }),
        }
        for id in order {
            // Gone when preempted for an earlier request of this loop.
            let Some(i) = self.index(id) else { continue };
            let a = &self.running[i];
            if prefill_only && a.left() == 1 {
                continue;
            }
            let n = self.fit(a.computed, a.left(), chunks_left, tokens_left);
            if n == 0 {
                continue;
            }
            let need = self.blocks_needed(a, n);
            if need + blocks_taken > self.free_blocks() && !self.preempt_for(id, need + blocks_taken, &plan) {
                continue;
            }
            let Some(i) = self.index(id) else { continue };
            let a = &self.running[i];
            blocks_taken += need;
            tokens_left -= n;
            chunks_left -= crate::engine::attention_chunks(a.computed, n);
            plan.push((id, n));
        }

        // Admit waiting requests while the budgets and the cache allow.
        let decoding = plan.iter().any(|&(id, _)| self.index(id).is_some_and(|i| self.running[i].left() == 1));
        while tokens_left > 0 && !(prefill_only && decoding) {
            let pick = match self.cfg.policy {
                Policy::ShortestPromptFirst => (0..self.waiting.len()).min_by_key(|&w| (self.waiting[w].left(), self.waiting[w].id)),
                _ => (!self.waiting.is_empty()).then_some(0),
            };
            let Some(w) = pick else { break };
            let Some(mut a) = self.waiting.remove(w) else { break };
            let (seq, cached) = self.engine.create_sequence_with_prefix(&a.tokens);
            a.seq = Some(seq);
            a.computed = cached;
            let n = self.fit(a.computed, a.left(), chunks_left, tokens_left);
            let need = self.blocks_needed(&a, n);
            if n == 0 || need + blocks_taken > self.free_blocks() {
                // Not now: give the shared blocks back and keep its place in the queue.
                self.release(&mut a);
                self.waiting.insert(w, a);
                break;
            }
            if a.admitted.is_none() {
                a.admitted = Some(Instant::now());
                a.cached_tokens = cached;
                self.stats.prefix_cache_hit_tokens += cached as u64;
            }
            blocks_taken += need;
            tokens_left -= n;
            chunks_left -= crate::engine::attention_chunks(a.computed, n);
            plan.push((a.id, n));
            let at = self.running.partition_point(|r| r.id < a.id);
            self.running.insert(at, a);
        }
        Ok(plan)
    }

    /// Tokens of `left` starting at position `start` that fit the budgets.
    fn fit(&self, start: usize, left: usize, chunks: usize, tokens: usize) -> usize {
        let n = Engine::prefill_fit(start, left, chunks, tokens);
        if !self.cfg.chunked_prefill && n < left && n < self.engine.max_batch_tokens() && left > 1 {
            // Without chunking a prompt runs whole or waits, unless it can never fit one step.
            let whole = Engine::prefill_fit(start, left, self.engine.attention_budget(), self.engine.max_batch_tokens());
            return if n >= whole { n } else { 0 };
        }
        n
    }

    fn blocks_needed(&self, a: &Active, n: usize) -> usize {
        let have = a.seq.and_then(|s| self.engine.sequence_blocks(s).ok()).unwrap_or(0);
        (a.computed + n).div_ceil(BLOCK_TOKENS).saturating_sub(have)
    }

    /// Frees the newest running requests newer than `me` and not yet in `plan` until `need`
    /// blocks are free. Returns whether that succeeded.
    fn preempt_for(&mut self, me: RequestId, need: usize, plan: &[(RequestId, usize)]) -> bool {
        while self.free_blocks() < need {
            let victim =
                (0..self.running.len()).rev().find(|&j| self.running[j].id > me && !plan.iter().any(|&(p, _)| p == self.running[j].id));
            let Some(j) = victim else { return false };
            let mut a = self.running.remove(j);
            tracing::debug!(request = a.id.0, "preempted: out of KV blocks");
            self.release(&mut a);
            a.preemptions += 1;
            self.stats.preemptions += 1;
            // Back to the queue in arrival order, ahead of everything newer.
            let at = self.waiting.partition_point(|w| w.id < a.id);
            self.waiting.insert(at, a);
        }
        true
    }

    fn release(&mut self, a: &mut Active) {
        if let Some(seq) = a.seq.take() {
            self.engine.free_sequence(seq);
        }
        a.computed = 0;
    }

    fn finish(&mut self, mut a: Active, reason: FinishReason) {
        self.release(&mut a);
        let now = Instant::now();
        let generated = a.generated();
        let timings = RequestTimings {
            prompt_tokens: a.req.prompt.len(),
            cached_tokens: a.cached_tokens,
            generated_tokens: generated,
            queued: a.admitted.unwrap_or(now) - a.arrival,
            ttft: a.first_token.filter(|_| a.req.resumed.is_empty()).map(|t| t - a.arrival),
            e2e: now - a.arrival,
            tpot: {
                // Tokens made here after the first one timed here.
                let here = if a.req.resumed.is_empty() { generated.saturating_sub(1) } else { generated - a.req.resumed.len() };
                a.first_token.filter(|_| here > 0).map(|t| (now - t) / here as u32)
            },
            preemptions: a.preemptions,
        };
        self.stats.finished += 1;
        a.sink.send(Event::Finished(reason, timings));
    }

    fn refresh_gauges(&mut self) {
        let u = self.engine.kv_usage();
        self.stats.running = self.running.len();
        self.stats.waiting = self.waiting.len();
        self.stats.queued_prefill_tokens =
            self.running.iter().chain(self.waiting.iter()).map(|a| a.req.prompt.len().saturating_sub(a.computed)).sum();
        self.stats.kv_blocks_used = u.used;
        self.stats.kv_blocks_cached = u.cached;
        self.stats.kv_blocks_total = u.total;
        self.stats.parked = self.parked.len();
    }
}

/// The part of `kv` at positions `from` and later.
fn trim_front(kv: KvLayer, from: usize) -> Option<KvLayer> {
    let end = kv.start + kv.tokens;
    if end <= from {
        return None;
    }
    if kv.start >= from {
        return Some(kv);
    }
    let skip = from - kv.start;
    let dim = kv.k.len() / kv.tokens.max(1);
    Some(KvLayer { layer: kv.layer, start: from, tokens: end - from, k: kv.k[skip * dim..].to_vec(), v: kv.v[skip * dim..].to_vec() })
}
