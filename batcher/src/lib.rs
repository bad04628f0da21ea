//! Dynamic batching. Requests enter through an async [`Batcher::infer`]; a scheduler OS
//! thread groups them into batches (up to `max_batch_size` items, waiting at most
//! `max_queue_delay` after the oldest request arrived); executor OS threads pull the
//! batches and run them. The batcher knows nothing about backends: an [`Executor`]
//! assembles its own batch buffer from the requests' payloads, so a request's bytes are
//! copied exactly once, straight into the buffer the engine reads.

mod config;
mod scheduler;
mod stats;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Instant;

use crossbeam_channel::Sender;
use tokio::sync::oneshot;

pub use config::BatcherConfig;
pub use stats::{BatchStats, StatsSnapshot};

/// One request's input, as seen by the batcher: it only needs to know how many batch
/// items (images, sequences) the request carries.
pub trait Payload: Send + 'static {
    fn items(&self) -> usize;
}

/// Runs batches. One instance lives on each executor thread, created there by the
/// factory passed to [`Batcher::spawn`], so device state never crosses threads.
pub trait Executor: Send + 'static {
    type Input: Payload;
    type Output: Send + 'static;

    /// Executes one batch made of `inputs` (in order) and returns one output per input,
    /// in the same order. An `Err` fails every request of the batch.
    fn execute(&mut self, inputs: &[&Self::Input]) -> Result<Vec<Self::Output>, ExecutorError>;
}

/// A failure inside an executor, with a message that is safe to log (not to show clients).
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct ExecutorError(pub String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BatchError {
    #[error("the request queue is full ({0} requests)")]
    QueueFull(usize),
    #[error("request has {items} items; the model accepts 1 to {max} per request")]
    BadItemCount { items: usize, max: usize },
    #[error("the batcher is shutting down")]
    ShuttingDown,
    #[error("execution failed: {0}")]
    Execution(String),
    #[error("the executor stopped before answering")]
    Lost,
    #[error("failed to start executor {index}: {reason}")]
    Startup { index: usize, reason: String },
}

pub(crate) struct Job<E: Executor> {
    input: E::Input,
    items: usize,
    enqueued: Instant,
    reply: oneshot::Sender<Result<E::Output, BatchError>>,
    slot: QueueSlot,
}

/// A request's place in the bounded queue. It is given back when execution starts, or
/// when the job is dropped on any other path (cancelled, failed), so no path can leak it.
pub(crate) struct QueueSlot {
    queued: Arc<AtomicUsize>,
    held: bool,
}

impl QueueSlot {
    pub(crate) fn release(&mut self) {
        if std::mem::take(&mut self.held) {
            self.queued.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl Drop for QueueSlot {
    fn drop(&mut self) {
        self.release();
    }
}

impl<E: Executor> Job<E> {
    /// The client went away (its future was dropped): don't spend compute on it.
    fn is_cancelled(&self) -> bool {
        self.reply.is_closed()
    }
}

/// Handle to a running batcher. Dropping it (or calling [`Batcher::shutdown`]) stops
/// admission; every request already admitted is still executed and answered.
pub struct Batcher<E: Executor> {
    config: BatcherConfig,
    submit: Mutex<Option<Sender<Job<E>>>>,
    queued: Arc<AtomicUsize>,
    stats: Arc<BatchStats>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl<E: Executor> std::fmt::Debug for Batcher<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batcher").field("config", &self.config).finish_non_exhaustive()
    }
}

impl<E: Executor> Batcher<E> {
    /// Starts the scheduler and `config.instance_count` executor threads. `factory(i)`
    /// builds executor `i` on its own thread; any failure is returned here and nothing
    /// keeps running.
    pub fn spawn<F>(config: BatcherConfig, factory: F) -> Result<Self, BatchError>
    where
        F: Fn(usize) -> Result<E, ExecutorError> + Send + Sync + 'static,
    {
        config.validate().map_err(|reason| BatchError::Startup { index: 0, reason })?;
        let stats = Arc::new(BatchStats::default());
        let queued = Arc::new(AtomicUsize::new(0));
        let (submit, threads) = scheduler::start(&config, factory, Arc::clone(&stats))?;
        Ok(Self { config, submit: Mutex::new(Some(submit)), queued, stats, threads: Mutex::new(threads) })
    }

    pub fn config(&self) -> &BatcherConfig {
        &self.config
    }

    pub fn stats(&self) -> StatsSnapshot {
        self.stats.snapshot(self.queued.load(Ordering::Relaxed))
    }

    /// Queues `input` and waits for its output. Dropping the returned future cancels the
    /// request if it has not started executing.
    pub async fn infer(&self, input: E::Input) -> Result<E::Output, BatchError> {
        let items = input.items();
        if items == 0 || items > self.config.max_batch_size {
            return Err(BatchError::BadItemCount { items, max: self.config.max_batch_size });
        }
        let (reply, answer) = oneshot::channel();
        {
            let guard = self.submit.lock().unwrap_or_else(PoisonError::into_inner);
            let Some(tx) = guard.as_ref() else {
                return Err(BatchError::ShuttingDown);
            };
            // Reserve a queue slot before sending, so the bound holds under races.
            let max = self.config.max_queue_size;
            if self.queued.fetch_add(1, Ordering::AcqRel) >= max {
                self.queued.fetch_sub(1, Ordering::AcqRel);
                self.stats.record_rejected();
                return Err(BatchError::QueueFull(max));
            }
            let slot = QueueSlot { queued: Arc::clone(&self.queued), held: true };
            let job = Job { input, items, enqueued: Instant::now(), reply, slot };
            if tx.send(job).is_err() {
                // The rejected job (and with it the slot) was dropped inside the error.
                return Err(BatchError::ShuttingDown);
            }
        }
        answer.await.unwrap_or(Err(BatchError::Lost))
    }

    /// Stops admission and waits until every admitted request has been answered and all
    /// threads have exited. Blocking: call it from a blocking context.
    pub fn shutdown(&self) {
        drop(self.submit.lock().unwrap_or_else(PoisonError::into_inner).take());
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(PoisonError::into_inner));
        for t in threads {
            if t.join().is_err() {
                tracing::error!("a batcher thread panicked");
            }
        }
    }
}

impl<E: Executor> Drop for Batcher<E> {
    fn drop(&mut self) {
        self.shutdown();
    }
}
