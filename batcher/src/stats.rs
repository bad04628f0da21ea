use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Counters the scheduler and executors update; read by metrics and benchmarks.
#[derive(Debug, Default)]
pub struct BatchStats {
    batches: AtomicU64,
    requests: AtomicU64,
    items: AtomicU64,
    cancelled: AtomicU64,
    rejected: AtomicU64,
    failed_batches: AtomicU64,
    queue_ns: AtomicU64,
    compute_ns: AtomicU64,
}

/// A point-in-time copy of [`BatchStats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StatsSnapshot {
    pub batches: u64,
    pub requests: u64,
    pub items: u64,
    pub cancelled: u64,
    pub rejected: u64,
    pub failed_batches: u64,
    /// Sum over executed requests of the time from admission to execution start.
    pub queue_time: Duration,
    /// Sum over batches of executor time.
    pub compute_time: Duration,
    pub queued_now: usize,
}

impl StatsSnapshot {
    pub fn mean_batch_items(&self) -> f64 {
        if self.batches == 0 { 0.0 } else { self.items as f64 / self.batches as f64 }
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

impl BatchStats {
    pub(crate) fn record_batch(&self, requests: usize, items: usize, queue: Duration, compute: Duration, ok: bool) {
        self.batches.fetch_add(1, Ordering::Relaxed);
        self.requests.fetch_add(requests as u64, Ordering::Relaxed);
        self.items.fetch_add(items as u64, Ordering::Relaxed);
        self.queue_ns.fetch_add(nanos(queue), Ordering::Relaxed);
        self.compute_ns.fetch_add(nanos(compute), Ordering::Relaxed);
        if !ok {
            self.failed_batches.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub(crate) fn record_cancelled(&self) {
        self.cancelled.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn record_rejected(&self) {
        self.rejected.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn snapshot(&self, queued_now: usize) -> StatsSnapshot {
        StatsSnapshot {
            batches: self.batches.load(Ordering::Relaxed),
            requests: self.requests.load(Ordering::Relaxed),
            items: self.items.load(Ordering::Relaxed),
            cancelled: self.cancelled.load(Ordering::Relaxed),
            rejected: self.rejected.load(Ordering::Relaxed),
            failed_batches: self.failed_batches.load(Ordering::Relaxed),
            queue_time: Duration::from_nanos(self.queue_ns.load(Ordering::Relaxed)),
            compute_time: Duration::from_nanos(self.compute_ns.load(Ordering::Relaxed)),
            queued_now,
        }
    }
}
