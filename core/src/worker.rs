//! The GPU worker: a named thread that owns the scheduler (and so the engine) and is fed by a
//! bounded channel, so async callers never block on the GPU.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use crate::error::{Error, Result};
use crate::kv::KvLayer;
use crate::scheduler::{Event, EventSink, Limits, Request, RequestId, Scheduler, SchedulerStats, Start};
use crate::stage::{StageReply, StageStep, Stages};

/// Where the answer to `park` goes (called on the GPU thread).
pub type ParkReply = Box<dyn FnOnce(Result<(u64, usize)>) + Send>;
/// Where the answer to `seal` goes (called on the GPU thread).
pub type SealReply = Box<dyn FnOnce(Result<()>) + Send>;
/// Where the answer to `stage_open` goes (called on the GPU thread): the session's id.
pub type StageOpenReply = Box<dyn FnOnce(Result<u64>) + Send>;
/// Where a stage session's exported K/V goes (called on the GPU thread).
pub type StageExportReply = Box<dyn FnOnce(Result<Vec<KvLayer>>) + Send>;
/// Where the positions a stage session holds go (called on the GPU thread).
pub type StageHeldReply = Box<dyn FnOnce(Result<usize>) + Send>;

/// Stage sessions one worker holds at most: each reserves its blocks, and this bounds the table
/// of a node whose cache is large.
pub const MAX_STAGE_SESSIONS: usize = 1024;

/// Work on parked sequences. It has its own channel, which never blocks its sender: K/V is
/// received on async tasks, and a GPU thread waiting for one of them (a prefill streaming
/// layers out) must never wait behind them. What it holds is bounded by the blocks reserved for
/// it: a transfer may not send more than it parked.
enum KvCommand {
    Import(u64, KvLayer),
    Seal(u64, SealReply),
    Touch(u64),
    Discard(u64),
    /// Into a stage session (`crate::stage`): its id, the layer.
    StageImport(u64, KvLayer),
    StageHeld(u64, StageHeldReply),
}

enum Command {
    Submit(RequestId, Request, Box<dyn EventSink>, Start),
    Cancel(RequestId),
    Park(Vec<u32>, ParkReply),
    /// Wakes the worker for K/V commands.
    Wake,
    StageOpen(usize, StageOpenReply),
    StageStep(u64, StageStep, StageReply),
    StageClose(u64),
    StageExport(u64, usize, usize, StageExportReply),
    /// Hand every request to its receiver to continue elsewhere.
    DetachAll,
    /// Stop taking requests; finish the running ones (`drain`) or cancel everything.
    Shutdown {
        drain: bool,
    },
}

/// A cheap, clonable handle to the worker thread.
#[derive(Clone)]
pub struct WorkerHandle {
    tx: SyncSender<Command>,
    kv: std::sync::mpsc::Sender<KvCommand>,
    stats: Arc<Mutex<SchedulerStats>>,
    next_id: Arc<AtomicU64>,
    limits: Limits,
    thread: Arc<Mutex<Option<JoinHandle<()>>>>,
}

impl std::fmt::Debug for WorkerHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerHandle").field("limits", &self.limits).finish()
    }
}

/// Commands that may queue up between two steps, beyond the scheduler's own waiting list.
const CHANNEL_BOUND: usize = 1024;

impl WorkerHandle {
    /// Starts the worker thread running `scheduler`.
    pub fn spawn(scheduler: Scheduler) -> Result<Self> {
        let limits = scheduler.limits();
        let stats = Arc::new(Mutex::new(scheduler.stats()));
        let (tx, rx) = std::sync::mpsc::sync_channel(CHANNEL_BOUND);
        let (kv, kv_rx) = std::sync::mpsc::channel();
        let shared = stats.clone();
        let thread = std::thread::Builder::new()
            .name("tandem-gpu".into())
            .spawn(move || run(scheduler, rx, kv_rx, shared))
            .map_err(|e| Error::InvalidRequest(format!("cannot start the GPU worker thread: {e}")))?;
        Ok(WorkerHandle { tx, kv, stats, next_id: Arc::default(), limits, thread: Arc::new(Mutex::new(Some(thread))) })
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// The scheduler's counters as of its last step.
    pub fn stats(&self) -> SchedulerStats {
        self.stats.lock().map(|s| *s).unwrap_or_default()
    }

    /// Checks and queues a request; its events go to `sink`.
    pub fn submit(&self, req: Request, sink: Box<dyn EventSink>) -> Result<RequestId> {
        self.submit_with(req, sink, Start::Compute)
    }

    /// `submit`, exporting the request's K/V as it is computed, or starting from imported K/V.
    pub fn submit_with(&self, req: Request, sink: Box<dyn EventSink>, start: Start) -> Result<RequestId> {
        let ticket = if let Start::Parked(t) = start { Some(t) } else { None };
        let r = self.limits.check(&req).and_then(|()| {
            let waiting = self.stats().waiting;
            if waiting >= self.limits.max_waiting {
                return Err(Error::Overloaded { waiting });
            }
            let id = RequestId(self.next_id.fetch_add(1, Ordering::Relaxed));
            self.send(Command::Submit(id, req, sink, start)).map(|()| id)
        });
        if let (Err(_), Some(t)) = (&r, ticket) {
            // Refused here: its parked K/V would otherwise wait out the timeout.
            self.discard(t);
        }
        r
    }

    fn send(&self, cmd: Command) -> Result<()> {
        match self.tx.try_send(cmd) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_)) => Err(Error::Overloaded { waiting: self.stats().waiting }),
            Err(TrySendError::Disconnected(_)) => Err(Error::InvalidRequest("the GPU worker has stopped".into())),
        }
    }

    /// Reserves a parked sequence for the K/V of `tokens`; `reply` gets its ticket and how many
    /// leading positions it holds already (from the prefix cache).
    pub fn park(&self, tokens: Vec<u32>, reply: ParkReply) -> Result<()> {
        self.send(Command::Park(tokens, reply))
    }

    fn kv_command(&self, cmd: KvCommand) -> Result<()> {
        self.kv.send(cmd).map_err(|_| Error::InvalidRequest("the GPU worker has stopped".into()))?;
        // Wakes an idle worker; a full queue means it is busy and will look anyway.
        let _ = self.tx.try_send(Command::Wake);
        Ok(())
    }

    /// Writes one received layer into a parked sequence (in order per layer). Never blocks.
    pub fn import(&self, ticket: u64, kv: KvLayer) -> Result<()> {
        self.kv_command(KvCommand::Import(ticket, kv))
    }

    /// Asks whether a parked sequence holds every position it was parked for (after every
    /// import sent before), and keeps it alive.
    pub fn seal(&self, ticket: u64, reply: SealReply) -> Result<()> {
        self.kv_command(KvCommand::Seal(ticket, reply))
    }

    /// Keeps a parked sequence from expiring while its sender is slow.
    pub fn touch(&self, ticket: u64) {
        let _ = self.kv_command(KvCommand::Touch(ticket));
    }

    /// Frees a parked sequence (its transfer failed or its request went elsewhere).
    pub fn discard(&self, ticket: u64) {
        let _ = self.kv_command(KvCommand::Discard(ticket));
    }

    /// Opens a stage session holding up to `positions` positions (`crate::stage`).
    pub fn stage_open(&self, positions: usize, reply: StageOpenReply) -> Result<()> {
        self.send(Command::StageOpen(positions, reply))
    }

    /// Queues a session's step; `reply` gets the hidden states or the sampled token.
    pub fn stage_step(&self, session: u64, step: StageStep, reply: StageReply) -> Result<()> {
        self.send(Command::StageStep(session, step, reply))
    }

    /// Writes one layer of K/V a prefill stage computed into a stage session (in order per
    /// layer, within the positions it reserved). Never blocks.
    pub fn stage_import(&self, session: u64, kv: KvLayer) -> Result<()> {
        self.kv_command(KvCommand::StageImport(session, kv))
    }

    /// The positions a stage session holds in every layer, after every import sent before.
    pub fn stage_held(&self, session: u64, reply: StageHeldReply) -> Result<()> {
        self.kv_command(KvCommand::StageHeld(session, reply))
    }

    /// Reads the K/V of positions `start..end` of a stage session, every layer it holds.
    pub fn stage_export(&self, session: u64, start: usize, end: usize, reply: StageExportReply) -> Result<()> {
        self.send(Command::StageExport(session, start, end, reply))
    }

    /// Ends a stage session and frees its blocks. Never blocks: a closing session must not wait
    /// behind a full queue, or its blocks would stay held.
    pub fn stage_close(&self, session: u64) {
        if let Err(TrySendError::Full(cmd)) = self.tx.try_send(Command::StageClose(session)) {
            let tx = self.tx.clone();
            std::thread::spawn(move || {
                let _ = tx.send(cmd);
            });
        }
    }

    /// Takes every request off this node: each receiver gets `Event::Detached`.
    pub fn detach_all(&self) -> Result<()> {
        self.send(Command::DetachAll)
    }

    /// Ends a request early (its blocks are freed before the next step).
    pub fn cancel(&self, id: RequestId) {
        let _ = self.tx.try_send(Command::Cancel(id));
    }

    /// Asks the worker to stop taking requests and to end once the running ones have finished
    /// (`drain`) or at once, cancelling them. Does not wait.
    pub fn request_stop(&self, drain: bool) {
        let _ = self.tx.try_send(Command::Shutdown { drain });
    }

    /// Waits for the worker thread to end (after `request_stop`).
    pub fn join(&self) {
        if let Some(t) = self.thread.lock().ok().and_then(|mut t| t.take()) {
            let _ = t.join();
        }
    }
}

fn run(mut sched: Scheduler, rx: Receiver<Command>, kv: Receiver<KvCommand>, stats: Arc<Mutex<SchedulerStats>>) {
    let mut stages = Stages::default();
    let mut stopping = false;
    let mut pending: Option<Command> = None;
    loop {
        kv_work(&mut sched, &mut stages, &kv);
        let mut cmds: Vec<Command> = pending.take().into_iter().collect();
        if cmds.is_empty() && !sched.has_work() && !stages.has_work() && !stopping {
            if sched.parked() > 0 {
                // Parked K/V must expire even when nothing else happens.
                match rx.recv_timeout(std::time::Duration::from_secs(1)) {
                    Ok(c) => cmds.push(c),
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                    Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
                }
                sched.expire_parked();
            } else {
                match rx.recv() {
                    Ok(c) => cmds.push(c),
                    // Every handle is gone.
                    Err(_) => break,
                }
            }
        }
        cmds.extend(std::iter::from_fn(|| rx.try_recv().ok()));
        // Imports sent before a request that uses them are in before it is submitted.
        kv_work(&mut sched, &mut stages, &kv);
        for cmd in cmds {
            match cmd {
                Command::Submit(id, req, mut sink, start) => {
                    if stopping {
                        if let Start::Parked(ticket) = start {
                            sched.discard(ticket);
                        }
                        sink.send(Event::Refused { overloaded: true, reason: "the server is shutting down".into() });
                    } else if let Err(e) = sched.submit_with(id, req, sink, start) {
                        tracing::debug!(request = id.0, error = %e, "request refused by the scheduler");
                    }
                }
                Command::Cancel(id) => sched.cancel(id),
                Command::Park(tokens, reply) => {
                    let r = if stopping { Err(Error::Overloaded { waiting: 0 }) } else { sched.park(tokens) };
                    reply(r);
                }
                Command::Wake => {}
                Command::StageOpen(positions, reply) => {
                    let r = if stopping {
                        Err(Error::Overloaded { waiting: 0 })
                    } else if stages.sessions() >= MAX_STAGE_SESSIONS {
                        Err(Error::Overloaded { waiting: stages.sessions() })
                    } else {
                        stages.open(sched.engine_mut(), positions)
                    };
                    reply(r);
                }
                Command::StageStep(session, step, reply) => stages.queue(session, step, reply),
                Command::StageClose(session) => stages.close(sched.engine_mut(), session),
                Command::StageExport(session, start, end, reply) => reply(stages.export(sched.engine_mut(), session, start, end)),
                Command::DetachAll => sched.detach_all(),
                Command::Shutdown { drain } => {
                    stopping = true;
                    if !drain {
                        sched.cancel_all();
                    }
                }
            }
        }
        if stopping && !sched.has_work() {
            break;
        }
        if stages.has_work() && !sched.has_work() {
            // A stage's engine runs no whole requests (the scheduler refuses them), so the two
            // never share the GPU; a whole-model node runs stage steps only between requests.
            let started = std::time::Instant::now();
            let (sessions, tokens) = stages.run(sched.engine_mut());
            if sessions > 0 {
                sched.count_stage_step(sessions, tokens, started.elapsed());
                if let Ok(mut s) = stats.lock() {
                    *s = sched.stats();
                }
            }
            continue;
        }
        if sched.parked() > 0 {
            sched.expire_parked();
        }
        if !step(&mut sched, &stats) && sched.has_work() {
            // Work that cannot run yet; wait for a command rather than spin.
            if let Ok(c) = rx.recv_timeout(std::time::Duration::from_millis(5)) {
                pending = Some(c);
            }
        }
    }
    if let Ok(mut s) = stats.lock() {
        *s = sched.stats();
    }
    tracing::info!("GPU worker stopped");
}

fn kv_work(sched: &mut Scheduler, stages: &mut Stages, kv: &Receiver<KvCommand>) {
    for cmd in std::iter::from_fn(|| kv.try_recv().ok()) {
        match cmd {
            KvCommand::Import(ticket, layer) => {
                if let Err(e) = sched.import(ticket, &layer) {
                    tracing::debug!(ticket, layer = layer.layer, error = %e, "KV import rejected; the sequence is freed");
                }
            }
            KvCommand::Seal(ticket, reply) => reply(sched.seal(ticket)),
            KvCommand::Touch(ticket) => sched.touch(ticket),
            KvCommand::Discard(ticket) => sched.discard(ticket),
            KvCommand::StageImport(session, layer) => {
                // A bad layer leaves the session short: its driver's next step is refused.
                if let Err(e) = stages.import(sched.engine_mut(), session, &layer) {
                    tracing::debug!(session, layer = layer.layer, error = %e, "stage K/V import rejected");
                }
            }
            KvCommand::StageHeld(session, reply) => reply(stages.held(sched.engine_mut(), session)),
        }
    }
}

/// Runs a step if one can run; returns whether it did.
fn step(sched: &mut Scheduler, stats: &Mutex<SchedulerStats>) -> bool {
    let ran = sched.step().unwrap_or_else(|e| {
        tracing::error!(error = %e, "scheduler step failed");
        false
    });
    if let Ok(mut s) = stats.lock() {
        *s = sched.stats();
    }
    ran
}
