//! The multi-threaded, in-order batch loader.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender, bounded};

use super::{Batch, Dataset};
use crate::error::TrainError;

/// Batches each worker may have finished ahead of the consumer.
const PREFETCH_PER_WORKER: usize = 2;

/// Builds batches on `workers` threads ahead of the consumer (bounded prefetch, 2×workers), yielding them
/// IN ORDER. Dropping the loader stops its threads promptly. Errors from `batch()` are yielded, not
/// panicked.
///
/// Worker `w` builds steps `w, w + workers, w + 2·workers, …` into its own bounded channel and the consumer
/// reads step `i` from channel `i % workers`: the order is fixed without any reordering buffer, and a worker
/// that gets ahead simply blocks on its full channel.
#[derive(Debug)]
pub struct Loader {
    receivers: Vec<Receiver<Result<Batch, TrainError>>>,
    threads: Vec<JoinHandle<()>>,
    stop: Arc<AtomicBool>,
    next: usize,
    total: usize,
}

impl Loader {
    /// Starts `workers` threads (at least one) building the batches of `steps`, one index list per step.
    pub fn new(dataset: Arc<dyn Dataset>, steps: Vec<Vec<usize>>, augment: Option<u64>, workers: usize) -> Self {
        let total = steps.len();
        let workers = workers.clamp(1, total.max(1));
        let steps = Arc::new(steps);
        let stop = Arc::new(AtomicBool::new(false));
        let mut receivers = Vec::with_capacity(workers);
        let mut threads = Vec::with_capacity(workers);
        for w in 0..workers {
            let (tx, rx) = bounded(PREFETCH_PER_WORKER);
            let job = Job { dataset: Arc::clone(&dataset), steps: Arc::clone(&steps), stop: Arc::clone(&stop) };
            let spawned = std::thread::Builder::new()
                .name(format!("kiln-loader-{w}"))
                .spawn(move || job.run(w, workers, augment, tx));
            match spawned {
                Ok(handle) => threads.push(handle),
                // No thread means nothing sends on this channel: the consumer reports that at step w.
                Err(e) => tracing::error!("cannot start data loader thread {w}: {e}"),
            }
            receivers.push(rx);
        }
        Loader { receivers, threads, stop, next: 0, total }
    }
}

impl Iterator for Loader {
    type Item = Result<Batch, TrainError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.next >= self.total {
            return None;
        }
        let step = self.next;
        let rx = &self.receivers[step % self.receivers.len()];
        match rx.recv() {
            Ok(batch) => {
                self.next += 1;
                Some(batch)
            }
            Err(_) => {
                // The worker is gone without sending this step; every later step of it would be missing too.
                self.next = self.total;
                Some(Err(TrainError::Data(format!("data loader worker for step {step} stopped unexpectedly"))))
            }
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let left = self.total - self.next;
        (left, Some(left))
    }
}

impl ExactSizeIterator for Loader {}

impl Drop for Loader {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Dropping the receivers makes a worker blocked on a full channel fail its send and exit.
        self.receivers.clear();
        for handle in self.threads.drain(..) {
            let _ = handle.join();
        }
    }
}

/// What one worker thread needs.
struct Job {
    dataset: Arc<dyn Dataset>,
    steps: Arc<Vec<Vec<usize>>>,
    stop: Arc<AtomicBool>,
}

impl Job {
    fn run(self, first: usize, stride: usize, augment: Option<u64>, tx: Sender<Result<Batch, TrainError>>) {
        for step in (first..self.steps.len()).step_by(stride) {
            if self.stop.load(Ordering::Relaxed) {
                return;
            }
            let indices = &self.steps[step];
            // A panicking dataset must surface as an error at its step, not as a hang or a lost thread.
            let batch = catch_unwind(AssertUnwindSafe(|| self.dataset.batch(indices, augment))).unwrap_or_else(|p| {
                let message = p
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| p.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown panic".into());
                Err(TrainError::Data(format!("building batch {step} panicked: {message}")))
            });
            if tx.send(batch).is_err() {
                return;
            }
        }
    }
}
