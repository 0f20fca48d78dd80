//! The GPU worker: a named thread that owns the scheduler (and so the engine) and is fed by a
//! bounded channel, so async callers never block on the GPU.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use crate::error::{Error, Result};
use crate::scheduler::{Event, EventSink, Limits, Request, RequestId, Scheduler, SchedulerStats};

enum Command {
    Submit(RequestId, Request, Box<dyn EventSink>),
    Cancel(RequestId),
    /// Stop taking requests; finish the running ones (`drain`) or cancel everything.
    Shutdown {
        drain: bool,
    },
}

/// A cheap, clonable handle to the worker thread.
#[derive(Clone)]
pub struct WorkerHandle {
    tx: SyncSender<Command>,
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
        let shared = stats.clone();
        let thread = std::thread::Builder::new()
            .name("tandem-gpu".into())
            .spawn(move || run(scheduler, rx, shared))
            .map_err(|e| Error::InvalidRequest(format!("cannot start the GPU worker thread: {e}")))?;
        Ok(WorkerHandle { tx, stats, next_id: Arc::default(), limits, thread: Arc::new(Mutex::new(Some(thread))) })
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
        self.limits.check(&req)?;
        let waiting = self.stats().waiting;
        if waiting >= self.limits.max_waiting {
            return Err(Error::Overloaded { waiting });
        }
        let id = RequestId(self.next_id.fetch_add(1, Ordering::Relaxed));
        match self.tx.try_send(Command::Submit(id, req, sink)) {
            Ok(()) => Ok(id),
            Err(TrySendError::Full(_)) => Err(Error::Overloaded { waiting }),
            Err(TrySendError::Disconnected(_)) => Err(Error::InvalidRequest("the GPU worker has stopped".into())),
        }
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

fn run(mut sched: Scheduler, rx: Receiver<Command>, stats: Arc<Mutex<SchedulerStats>>) {
    let mut stopping = false;
    let mut pending: Option<Command> = None;
    loop {
        let mut cmds: Vec<Command> = pending.take().into_iter().collect();
        if cmds.is_empty() && !sched.has_work() && !stopping {
            match rx.recv() {
                Ok(c) => cmds.push(c),
                // Every handle is gone.
                Err(_) => break,
            }
        }
        cmds.extend(std::iter::from_fn(|| rx.try_recv().ok()));
        for cmd in cmds {
            match cmd {
                Command::Submit(id, req, mut sink) => {
                    if stopping {
                        sink.send(Event::Refused { overloaded: true, reason: "the server is shutting down".into() });
                    } else if let Err(e) = sched.submit(id, req, sink) {
                        tracing::debug!(request = id.0, error = %e, "request refused by the scheduler");
                    }
                }
                Command::Cancel(id) => sched.cancel(id),
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
