//! A request's link to the local GPU worker: the channel its scheduler events arrive on, and the
//! guard that cancels it there if its task ends first.

use tandem_core::scheduler::Event;
use tokio::sync::mpsc;

/// Delivers scheduler events to the request's task. Unbounded, yet bounded in practice: a
/// request produces at most `max_tokens` + 1 events.
pub(super) struct ChannelSink(pub(super) mpsc::UnboundedSender<Event>);

impl tandem_core::scheduler::EventSink for ChannelSink {
    fn send(&mut self, event: Event) -> bool {
        self.0.send(event).is_ok()
    }
    fn is_closed(&self) -> bool {
        self.0.is_closed()
    }
}

/// Cancels the request in the scheduler when dropped before it finished (client gone).
pub(super) struct CancelGuard {
    pub(super) worker: tandem_core::worker::WorkerHandle,
    /// None where no scheduler runs it (a chain's driver stops when its events are not taken).
    pub(super) id: Option<tandem_core::scheduler::RequestId>,
    pub(super) finished: bool,
}

impl Drop for CancelGuard {
    fn drop(&mut self) {
        if let (false, Some(id)) = (self.finished, self.id) {
            self.worker.cancel(id);
        }
    }
}
