//! Dynamic batching. Requests enter through the async [`Batcher::infer_with`]; a
//! scheduler OS thread groups them into batches; executor OS threads run them. The
//! batcher knows nothing about backends: an [`Executor`] assembles its own batch buffer
//! from the requests' payloads, so a request's bytes are copied exactly once, straight
//! into the buffer the engine reads.
//!
//! Semantics (per model): at most `max_batch_size` items per batch; a batch waits at
//! most the queue delay (fixed, or adaptive under a p99 target) after its oldest
//! request arrived, and is dispatched at once when full or at a preferred size; it
//! keeps growing while no executor is free. At most `max_queue_size` requests wait;
//! more are refused at once. A request still queued at its deadline is answered with
//! [`BatchError::Timeout`] and never executed; one whose caller went away is dropped
//! before execution. Priority levels with aging (see `queue.rs`). Requests of more
//! items than `max_batch_size` are split across batches and their outputs joined in
//! order. Shutdown executes every admitted request before the threads exit.

mod adaptive;
mod config;
mod queue;
mod scheduler;
mod stats;
mod ticket;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;
use tokio::sync::oneshot;

use crate::adaptive::QueueDelay;
use crate::stats::Observers;
use crate::ticket::Ticket;

pub use config::BatcherConfig;
pub use stats::{BatchObserver, BatchRecord, BatchStats, StatsSnapshot};

/// One request's input, as seen by the batcher.
pub trait Payload: Sized + Send + 'static {
    /// Batch items (images, sequences) this request carries.
    fn items(&self) -> usize;

    /// Splits into consecutive parts of the given item counts. Only requests larger
    /// than `max_batch_size` are split; payloads that cannot be split refuse them.
    fn split(self, sizes: &[usize]) -> Result<Vec<Self>, ExecutorError> {
        let _ = sizes;
        Err(ExecutorError("this request type cannot be split across batches".into()))
    }
}

/// Runs batches. One instance lives on each executor thread, created there by the
/// factory passed to [`Batcher::spawn`], so device state never crosses threads.
pub trait Executor: Send + 'static {
    type Input: Payload;
    type Output: Send + 'static;

    /// Executes one batch made of `inputs` (in order) and returns one output per input,
    /// in the same order. An `Err` fails every request of the batch.
    fn execute(&mut self, inputs: &[&Self::Input]) -> Result<Vec<Self::Output>, ExecutorError>;

    /// Joins the outputs of a split request's parts, in order.
    fn join(parts: Vec<Self::Output>) -> Result<Self::Output, ExecutorError> {
        let _ = parts;
        Err(ExecutorError("this executor cannot join split requests".into()))
    }
}

/// A failure inside an executor, with a message that is safe to log (not to show clients).
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct ExecutorError(pub String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BatchError {
    #[error("the request queue is full ({0} requests)")]
    QueueFull(usize),
    #[error("request has {items} items; {reason}")]
    BadItemCount { items: usize, reason: String },
    #[error("priority {given} is outside 1..={levels}")]
    BadPriority { given: u32, levels: u32 },
    #[error("the request's deadline passed while it was queued")]
    Timeout,
    #[error("the batcher is shutting down")]
    ShuttingDown,
    #[error("execution failed: {0}")]
    Execution(String),
    #[error("the executor stopped before answering")]
    Lost,
    #[error("failed to start executor {index}: {reason}")]
    Startup { index: usize, reason: String },
}

/// Per-request scheduling options; `None` takes the model's default.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct InferOptions {
    /// 1 is the highest level.
    pub priority: Option<u32>,
    /// Time from admission after which a still-queued request is refused.
    pub timeout: Option<Duration>,
}

pub(crate) struct Job<E: Executor> {
    input: E::Input,
    items: usize,
    priority: u32,
    enqueued: Instant,
    deadline: Option<Instant>,
    ticket: Arc<Ticket>,
    reply: oneshot::Sender<Result<E::Output, BatchError>>,
}

/// Marks the request cancelled if the caller's future is dropped while it is queued.
struct CancelOnDrop<'a> {
    ticket: Arc<Ticket>,
    observers: &'a Observers,
}

impl Drop for CancelOnDrop<'_> {
    fn drop(&mut self) {
        if self.ticket.cancel() {
            self.observers.each(|o| o.request_cancelled());
        }
    }
}

/// Handle to a running batcher. Dropping it (or calling [`Batcher::shutdown`]) stops
/// admission; every request already admitted is still executed and answered.
pub struct Batcher<E: Executor> {
    config: BatcherConfig,
    submit: Mutex<Option<Sender<Job<E>>>>,
    queued: Arc<AtomicUsize>,
    observers: Arc<Observers>,
    delay: Arc<QueueDelay>,
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
        Self::spawn_observed(config, None, factory)
    }

    /// [`Batcher::spawn`] with an observer that receives every batch's timings.
    pub fn spawn_observed<F>(
        config: BatcherConfig,
        observer: Option<Arc<dyn BatchObserver>>,
        factory: F,
    ) -> Result<Self, BatchError>
    where
        F: Fn(usize) -> Result<E, ExecutorError> + Send + Sync + 'static,
    {
        config.validate().map_err(|reason| BatchError::Startup { index: 0, reason })?;
        let observers = Arc::new(Observers { stats: BatchStats::default(), extra: observer });
        let delay = Arc::new(QueueDelay::new(config.max_queue_delay, config.target_p99));
        let shared = scheduler::Shared { observers: Arc::clone(&observers), delay: Arc::clone(&delay) };
        let (submit, threads) = scheduler::start(&config, factory, shared)?;
        Ok(Self {
            config,
            submit: Mutex::new(Some(submit)),
            queued: Arc::new(AtomicUsize::new(0)),
            observers,
            delay,
            threads: Mutex::new(threads),
        })
    }

    pub fn config(&self) -> &BatcherConfig {
        &self.config
    }

    pub fn stats(&self) -> StatsSnapshot {
        self.observers.stats.snapshot(self.queued.load(Ordering::Relaxed), self.delay.current())
    }

    /// [`Batcher::infer_with`] with the model's default priority and timeout.
    pub async fn infer(&self, input: E::Input) -> Result<E::Output, BatchError> {
        self.infer_with(input, InferOptions::default()).await
    }

    /// Queues `input` and waits for its output. Dropping the returned future cancels the
    /// request if it has not started executing.
    pub async fn infer_with(&self, input: E::Input, options: InferOptions) -> Result<E::Output, BatchError> {
        let items = input.items();
        let max = self.config.max_batch_size;
        if items == 0 {
            return Err(BatchError::BadItemCount { items, reason: "a request needs at least one".into() });
        }
        if items <= max {
            return self.infer_one(input, items, options).await;
        }
        // Each part takes a queue slot: refuse before allocating parts that could never fit.
        let parts = items.div_ceil(max);
        if parts > self.config.max_queue_size {
            return Err(BatchError::BadItemCount {
                items,
                reason: format!("it would need {parts} batches; the queue holds {}", self.config.max_queue_size),
            });
        }
        let sizes: Vec<usize> = (0..items).step_by(max).map(|start| max.min(items - start)).collect();
        let parts = input.split(&sizes).map_err(|e| BatchError::BadItemCount { items, reason: e.0 })?;
        let futures = parts.into_iter().zip(sizes).map(|(part, n)| self.infer_one(part, n, options));
        let outputs = futures_util::future::try_join_all(futures).await?;
        E::join(outputs).map_err(|e| BatchError::Execution(e.0))
    }

    async fn infer_one(&self, input: E::Input, items: usize, options: InferOptions) -> Result<E::Output, BatchError> {
        let levels = self.config.priority_levels;
        let priority = match options.priority {
            None => self.config.default_priority,
            Some(p) if (1..=levels).contains(&p) => p,
            Some(given) => return Err(BatchError::BadPriority { given, levels }),
        };
        let enqueued = Instant::now();
        let deadline = options.timeout.or(self.config.default_timeout).and_then(|t| enqueued.checked_add(t));
        let (reply, mut answer) = oneshot::channel();
        let ticket = {
            let guard = self.submit.lock().unwrap_or_else(PoisonError::into_inner);
            let Some(tx) = guard.as_ref() else {
                return Err(BatchError::ShuttingDown);
            };
            // Reserve a queue slot before sending, so the bound holds under races.
            let max = self.config.max_queue_size;
            if self.queued.fetch_add(1, Ordering::AcqRel) >= max {
                self.queued.fetch_sub(1, Ordering::AcqRel);
                self.observers.each(|o| o.request_rejected());
                return Err(BatchError::QueueFull(max));
            }
            let ticket = Arc::new(Ticket::new(Arc::clone(&self.queued)));
            let job = Job { input, items, priority, enqueued, deadline, ticket: Arc::clone(&ticket), reply };
            if tx.send(job).is_err() {
                // The job, and with it the ticket's hold on the slot, died with the error.
                return Err(BatchError::ShuttingDown);
            }
            ticket
        };
        let _cancel = CancelOnDrop { ticket: Arc::clone(&ticket), observers: &self.observers };
        if let Some(deadline) = deadline {
            match tokio::time::timeout_at(deadline.into(), &mut answer).await {
                Ok(result) => return result.unwrap_or(Err(BatchError::Lost)),
                Err(_) if ticket.expire() => {
                    self.observers.each(|o| o.request_expired());
                    return Err(BatchError::Timeout);
                }
                // Already executing: its answer is on the way.
                Err(_) => {}
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
