//! A request's lifecycle, shared by the waiting client and the batcher threads.
//! Exactly one party moves it out of `QUEUED` (compare-and-swap), and that party gives
//! the queue slot back: the executor when it starts the request, the client when its
//! deadline passes or it goes away. So a request is executed at most once, never after
//! its deadline, and its slot can never leak.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};

const QUEUED: u8 = 0;
const RUNNING: u8 = 1;
const EXPIRED: u8 = 2;
const CANCELLED: u8 = 3;

#[derive(Debug)]
pub(crate) struct Ticket {
    state: AtomicU8,
    queued: Arc<AtomicUsize>,
}

impl Ticket {
    /// The caller has already counted this request in `queued`.
    pub(crate) fn new(queued: Arc<AtomicUsize>) -> Self {
        Self { state: AtomicU8::new(QUEUED), queued }
    }

    fn leave_queue(&self, to: u8) -> bool {
        let moved = self.state.compare_exchange(QUEUED, to, Ordering::AcqRel, Ordering::Acquire).is_ok();
        if moved {
            self.queued.fetch_sub(1, Ordering::AcqRel);
        }
        moved
    }

    /// Executor: claim the request for execution.
    pub(crate) fn start(&self) -> bool {
        self.leave_queue(RUNNING)
    }

    /// Deadline passed while still queued.
    pub(crate) fn expire(&self) -> bool {
        self.leave_queue(EXPIRED)
    }

    /// The client went away while still queued.
    pub(crate) fn cancel(&self) -> bool {
        self.leave_queue(CANCELLED)
    }

    pub(crate) fn is_queued(&self) -> bool {
        self.state.load(Ordering::Acquire) == QUEUED
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        // Last holder gone while queued (e.g. the job was dropped with its channel).
        if *self.state.get_mut() == QUEUED {
            self.queued.fetch_sub(1, Ordering::AcqRel);
        }
    }
}
