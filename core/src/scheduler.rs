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

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::engine::{Engine, SamplingParams, StepInput};
use crate::error::{Error, Result};
use crate::kv::{BLOCK_TOKENS, SeqId};

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
    /// Requests that may wait for admission before new ones are refused.
    pub max_waiting: usize,
}

impl Limits {
    /// Whether `req` could ever run (the queue length is not checked here).
    pub fn check(&self, req: &Request) -> Result<()> {
        if req.prompt.is_empty() {
            return Err(Error::InvalidRequest("the prompt is empty".into()));
        }
        if let Some(&id) = req.prompt.iter().find(|&&id| id as usize >= self.vocab_size) {
            return Err(Error::TokenOutOfRange { id, vocab: self.vocab_size });
        }
        let positions = req.prompt.len() + req.max_tokens;
        if positions > self.context_length {
            return Err(Error::ContextOverflow { tokens: req.prompt.len(), max_new: req.max_tokens, context: self.context_length });
        }
        let blocks = positions.div_ceil(BLOCK_TOKENS);
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
}

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
}

/// Continuous batching over one engine.
pub struct Scheduler {
    engine: Engine,
    cfg: SchedulerConfig,
    waiting: VecDeque<Active>,
    /// Admitted requests, oldest first.
    running: Vec<Active>,
    stats: SchedulerStats,
}

impl Scheduler {
    pub fn new(engine: Engine, cfg: SchedulerConfig) -> Self {
        let mut s = Scheduler { engine, cfg, waiting: VecDeque::new(), running: Vec::new(), stats: SchedulerStats::default() };
        s.refresh_gauges();
        s
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    pub fn stats(&self) -> SchedulerStats {
        self.stats
    }

    /// Whether any request is waiting or running.
    pub fn has_work(&self) -> bool {
        !self.waiting.is_empty() || !self.running.is_empty()
    }

    /// What a request must fit in to ever run here.
    pub fn limits(&self) -> Limits {
        Limits {
            context_length: self.engine.context_length(),
            vocab_size: self.engine.config.vocab_size,
            kv_blocks: self.engine.kv_usage().total,
            max_waiting: self.cfg.max_waiting,
        }
    }

    /// Queues a request; its events go to `sink`. Ids must increase with arrival (they order
    /// the queue); a refused request is told why through `sink` as well.
    pub fn submit(&mut self, id: RequestId, req: Request, mut sink: Box<dyn EventSink>) -> Result<RequestId> {
        let checked = match self.limits().check(&req) {
            Ok(()) if self.waiting.len() >= self.cfg.max_waiting => Err(Error::Overloaded { waiting: self.waiting.len() }),
            other => other,
        };
        if let Err(e) = checked {
            sink.send(Event::Refused { overloaded: matches!(e, Error::Overloaded { .. }), reason: e.to_string() });
            return Err(e);
        }
        self.stats.prompt_tokens += req.prompt.len() as u64;
        let tokens = req.prompt.clone();
        self.waiting.push_back(Active {
            id,
            req,
            sink,
            tokens,
            computed: 0,
            seq: None,
            arrival: Instant::now(),
            admitted: None,
            first_token: None,
            cached_tokens: 0,
            preemptions: 0,
        });
        self.refresh_gauges();
        Ok(id)
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
        self.drop_closed();
        let plan = self.plan()?;
        if plan.is_empty() {
            self.refresh_gauges();
            return Ok(false);
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
        let sampled = match self.engine.step(&inputs) {
            Ok(s) => s,
            Err(e) => {
                // A step that fails fails its requests, not the server.
                let msg = e.to_string();
                tracing::error!(error = %msg, "engine step failed");
                let mut idx: Vec<usize> = plan.iter().map(|&(i, _)| i).collect();
                idx.sort_unstable_by(|a, b| b.cmp(a));
                for i in idx {
                    let mut a = self.running.remove(i);
                    a.sink.send(Event::Failed(msg.clone()));
                    self.release(&mut a);
                }
                self.refresh_gauges();
                return Ok(true);
            }
        };
        self.stats.steps += 1;
        let now = Instant::now();
        let mut done = Vec::new();
        for (&(i, n), token) in plan.iter().zip(sampled) {
            let a = &mut self.running[i];
            a.computed += n;
            let Some(token) = token else { continue };
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
                done.push((i, r));
            }
        }
        done.sort_unstable_by_key(|&(i, _)| std::cmp::Reverse(i));
        for (i, reason) in done {
            let a = self.running.remove(i);
            self.finish(a, reason);
        }
        self.refresh_gauges();
        Ok(true)
    }

    fn drop_closed(&mut self) {
        let closed: Vec<RequestId> = self.running.iter().chain(self.waiting.iter()).filter(|a| a.sink.is_closed()).map(|a| a.id).collect();
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
            ttft: a.first_token.map(|t| t - a.arrival),
            e2e: now - a.arrival,
            tpot: a.first_token.filter(|_| generated > 1).map(|t| (now - t) / (generated as u32 - 1)),
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
    }
}
