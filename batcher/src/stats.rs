use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// What one executed batch looked like; handed to every [`BatchObserver`].
#[derive(Debug, Clone, Copy)]
pub struct BatchRecord<'a> {
    pub requests: usize,
    pub items: usize,
    /// Per request: admission to execution start.
    pub queue_times: &'a [Duration],
    pub compute: Duration,
    pub ok: bool,
}

/// Receives every timing the batcher measures; the metrics layer implements it.
pub trait BatchObserver: Send + Sync + 'static {
    fn batch_executed(&self, record: &BatchRecord<'_>);
    fn request_rejected(&self) {}
    fn request_expired(&self) {}
    fn request_cancelled(&self) {}
}

/// Built-in counters, always kept; read through [`crate::Batcher::stats`].
#[derive(Debug, Default)]
pub struct BatchStats {
    batches: AtomicU64,
    requests: AtomicU64,
    items: AtomicU64,
    cancelled: AtomicU64,
    expired: AtomicU64,
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
    pub expired: u64,
    pub rejected: u64,
    pub failed_batches: u64,
    /// Sum over executed requests of the time from admission to execution start.
    pub queue_time: Duration,
    /// Sum over batches of executor time.
    pub compute_time: Duration,
    pub queued_now: usize,
    /// The queue delay in force (adaptive or fixed).
    pub queue_delay: Duration,
}

impl StatsSnapshot {
    pub fn mean_batch_items(&self) -> f64 {
        if self.batches == 0 { 0.0 } else { self.items as f64 / self.batches as f64 }
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

impl BatchObserver for BatchStats {
    fn batch_executed(&self, r: &BatchRecord<'_>) {
        self.batches.fetch_add(1, Ordering::Relaxed);
        self.requests.fetch_add(r.requests as u64, Ordering::Relaxed);
        self.items.fetch_add(r.items as u64, Ordering::Relaxed);
        self.queue_ns.fetch_add(r.queue_times.iter().copied().map(nanos).sum(), Ordering::Relaxed);
        self.compute_ns.fetch_add(nanos(r.compute), Ordering::Relaxed);
        if !r.ok {
            self.failed_batches.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn request_rejected(&self) {
        self.rejected.fetch_add(1, Ordering::Relaxed);
    }

    fn request_expired(&self) {
        self.expired.fetch_add(1, Ordering::Relaxed);
    }

    fn request_cancelled(&self) {
        self.cancelled.fetch_add(1, Ordering::Relaxed);
    }
}

impl BatchStats {
    pub(crate) fn snapshot(&self, queued_now: usize, queue_delay: Duration) -> StatsSnapshot {
        StatsSnapshot {
            batches: self.batches.load(Ordering::Relaxed),
            requests: self.requests.load(Ordering::Relaxed),
            items: self.items.load(Ordering::Relaxed),
            cancelled: self.cancelled.load(Ordering::Relaxed),
            expired: self.expired.load(Ordering::Relaxed),
            rejected: self.rejected.load(Ordering::Relaxed),
            failed_batches: self.failed_batches.load(Ordering::Relaxed),
            queue_time: Duration::from_nanos(self.queue_ns.load(Ordering::Relaxed)),
            compute_time: Duration::from_nanos(self.compute_ns.load(Ordering::Relaxed)),
            queued_now,
            queue_delay,
        }
    }
}

/// The built-in counters plus an optional user observer, called in that order.
#[derive(Default)]
pub(crate) struct Observers {
    pub(crate) stats: BatchStats,
    pub(crate) extra: Option<Arc<dyn BatchObserver>>,
}

impl Observers {
    pub(crate) fn each(&self, f: impl Fn(&dyn BatchObserver)) {
        f(&self.stats);
        if let Some(extra) = &self.extra {
            f(extra.as_ref());
        }
    }
}
