//! The scheduler thread forms batches; executor threads run them. Executors announce
//! that they are idle on `idle`, and the scheduler keeps growing the next batch until
//! one is: a batch is sealed only when it can start at once, so requests never sit in
//! a sealed, half-empty batch while a fuller one could form.

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, select};

use crate::adaptive::QueueDelay;
use crate::queue::Pending;
use crate::stats::{BatchRecord, Observers};
use crate::{BatchError, BatcherConfig, Executor, ExecutorError, Job};

/// State the scheduler and executors share with the [`crate::Batcher`] handle.
#[derive(Clone)]
pub(crate) struct Shared {
    pub(crate) observers: Arc<Observers>,
    pub(crate) delay: Arc<QueueDelay>,
}

type Threads = Vec<JoinHandle<()>>;

pub(crate) fn start<E, F>(
    config: &BatcherConfig,
    factory: F,
    shared: Shared,
) -> Result<(Sender<Job<E>>, Threads), BatchError>
where
    E: Executor,
    F: Fn(usize) -> Result<E, ExecutorError> + Send + Sync + 'static,
{
    let (submit_tx, submit_rx) = crossbeam_channel::unbounded::<Job<E>>();
    let (batch_tx, batch_rx) = crossbeam_channel::unbounded::<Vec<Job<E>>>();
    let (idle_tx, idle_rx) = crossbeam_channel::unbounded::<()>();
    let (ready_tx, ready_rx) = crossbeam_channel::unbounded::<Result<(), BatchError>>();
    let factory = Arc::new(factory);

    let mut threads = Vec::with_capacity(config.instance_count + 1);
    for index in 0..config.instance_count {
        let (factory, batch_rx, idle_tx, ready_tx) =
            (Arc::clone(&factory), batch_rx.clone(), idle_tx.clone(), ready_tx.clone());
        let shared = shared.clone();
        let spawned =
            std::thread::Builder::new().name(format!("kiln-exec-{index}")).spawn(move || match factory(index) {
                Ok(executor) => {
                    let _ = ready_tx.send(Ok(()));
                    drop(ready_tx);
                    run_executor(executor, &batch_rx, &idle_tx, &shared);
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(BatchError::Startup { index, reason: e.0 }));
                }
            });
        match spawned {
            Ok(handle) => threads.push(handle),
            Err(e) => return Err(BatchError::Startup { index, reason: e.to_string() }),
        }
    }
    drop((ready_tx, idle_tx));

    // Wait for every executor; on any failure close the batch channel so the others exit.
    for _ in 0..config.instance_count {
        let outcome = ready_rx.recv().unwrap_or(Err(BatchError::Startup { index: 0, reason: "panicked".into() }));
        if let Err(e) = outcome {
            drop(batch_tx);
            for t in threads {
                let _ = t.join();
            }
            return Err(e);
        }
    }

    let config = config.clone();
    let scheduler = std::thread::Builder::new()
        .name("kiln-scheduler".into())
        .spawn(move || Scheduler::new(&config, submit_rx, batch_tx, idle_rx, shared).run())
        .map_err(|e| BatchError::Startup { index: 0, reason: e.to_string() })?;
    threads.push(scheduler);
    Ok((submit_tx, threads))
}

struct Scheduler<E: Executor> {
    max: usize,
    preferred: Vec<usize>,
    submit: Receiver<Job<E>>,
    batches: Sender<Vec<Job<E>>>,
    idle: Receiver<()>,
    idle_executors: usize,
    pending: Pending<E>,
    closed: bool,
    delay: Arc<QueueDelay>,
}

impl<E: Executor> Scheduler<E> {
    fn new(
        config: &BatcherConfig,
        submit: Receiver<Job<E>>,
        batches: Sender<Vec<Job<E>>>,
        idle: Receiver<()>,
        shared: Shared,
    ) -> Self {
        let mut preferred = config.preferred_batch_sizes.clone();
        preferred.sort_unstable();
        Self {
            max: config.max_batch_size,
            preferred,
            submit,
            batches,
            idle,
            idle_executors: 0,
            pending: Pending::new(config.priority_levels, config.priority_aging),
            closed: false,
            delay: shared.delay,
        }
    }

    fn admit(&mut self, job: Result<Job<E>, impl Sized>) {
        match job {
            Ok(job) => self.pending.push(job),
            Err(_) => self.closed = true,
        }
    }

    /// How many items to dispatch now, or `None` to keep waiting. Early dispatch at a
    /// preferred size happens only when the requests next in line make up exactly that
    /// size (a trial take, put back), so a batch is never sealed at an arbitrary size.
    fn dispatch_limit(&mut self, now: Instant, due: bool) -> Option<usize> {
        let items = self.pending.items();
        if items >= self.max || due || self.closed {
            return Some(self.max);
        }
        for i in (0..self.preferred.len()).rev() {
            let p = self.preferred[i];
            if p > items {
                continue;
            }
            let (jobs, got) = self.pending.take(p, now);
            self.pending.restore(jobs);
            if got == p {
                return Some(p);
            }
        }
        None
    }

    fn run(mut self) {
        loop {
            if self.pending.is_empty() {
                if self.closed {
                    return;
                }
                let job = self.submit.recv();
                self.admit(job);
                continue;
            }
            while let Ok(job) = self.submit.try_recv() {
                self.pending.push(job);
            }
            self.pending.purge_fronts();
            let Some(oldest) = self.pending.oldest() else { continue };
            let due_at = oldest + self.delay.current();
            let now = Instant::now();
            if self.dispatch_limit(now, now >= due_at).is_none() {
                let job = self.submit.recv_deadline(due_at);
                if !matches!(job, Err(RecvTimeoutError::Timeout)) {
                    self.admit(job.map_err(|_| ()));
                }
                continue;
            }
            if !self.wait_for_executor() {
                return self.fail_all(Vec::new());
            }
            // Requests that arrived while we waited compete by priority too.
            while let Ok(job) = self.submit.try_recv() {
                self.pending.push(job);
            }
            // One clock reading for the decision and the take, so aging cannot reorder
            // the queue between them and seal a batch short of the preferred size.
            let now = Instant::now();
            let limit = self.dispatch_limit(now, now >= due_at).unwrap_or(self.max);
            let (jobs, _) = self.pending.take(limit, now);
            if jobs.is_empty() {
                continue; // everything left had expired or been cancelled; keep the executor
            }
            self.idle_executors -= 1;
            if let Err(e) = self.batches.send(jobs) {
                return self.fail_all(e.0);
            }
        }
    }

    /// Blocks until an executor is idle, still admitting requests meanwhile so the batch
    /// keeps growing. False when every executor is gone.
    fn wait_for_executor(&mut self) -> bool {
        while self.idle.try_recv().is_ok() {
            self.idle_executors += 1;
        }
        while self.idle_executors == 0 {
            if self.closed || self.pending.items() >= self.max {
                if self.idle.recv().is_err() {
                    return false;
                }
                self.idle_executors += 1;
                break;
            }
            select! {
                recv(self.idle) -> token => {
                    if token.is_err() {
                        return false;
                    }
                    self.idle_executors += 1;
                }
                recv(self.submit) -> job => self.admit(job),
            }
        }
        true
    }

    /// Every executor is gone: answer whatever is left instead of leaving clients waiting.
    fn fail_all(mut self, extra: Vec<Job<E>>) {
        for job in extra.into_iter().chain(self.pending.drain()).chain(self.submit.try_iter()) {
            let _ = job.reply.send(Err(BatchError::Lost));
        }
    }
}

fn run_executor<E: Executor>(mut executor: E, batches: &Receiver<Vec<Job<E>>>, idle: &Sender<()>, shared: &Shared) {
    let observers = &shared.observers;
    loop {
        // A send error means the scheduler is gone; still drain the batches it sealed.
        let _ = idle.send(());
        let Ok(batch) = batches.recv() else { return };
        let started = Instant::now();
        // Claim each request; skip those cancelled or past their deadline meanwhile.
        let mut jobs: Vec<Job<E>> = Vec::with_capacity(batch.len());
        for job in batch {
            if job.deadline.is_some_and(|d| d <= started) {
                // The client's own timer may not have fired yet: answer it here.
                if job.ticket.expire() {
                    observers.each(|o| o.request_expired());
                    let _ = job.reply.send(Err(BatchError::Timeout));
                }
            } else if job.ticket.start() {
                jobs.push(job);
            }
        }
        if jobs.is_empty() {
            continue;
        }
        let items: usize = jobs.iter().map(|j| j.items).sum();
        let queue_times: Vec<Duration> = jobs.iter().map(|j| started.saturating_duration_since(j.enqueued)).collect();
        let inputs: Vec<&E::Input> = jobs.iter().map(|j| &j.input).collect();
        let result = executor.execute(&inputs);
        drop(inputs);
        let finished = Instant::now();
        let outcome = match result {
            Ok(outputs) if outputs.len() == jobs.len() => Ok(outputs),
            Ok(outputs) => Err(BatchError::Execution(format!(
                "executor returned {} outputs for {} requests",
                outputs.len(),
                jobs.len()
            ))),
            Err(e) => Err(BatchError::Execution(e.0)),
        };
        let record = BatchRecord {
            requests: jobs.len(),
            items,
            queue_times: &queue_times,
            compute: finished - started,
            ok: outcome.is_ok(),
        };
        observers.each(|o| o.batch_executed(&record));
        shared.delay.observe(jobs.iter().map(|j| finished.saturating_duration_since(j.enqueued)));
        match outcome {
            Ok(outputs) => {
                for (job, out) in jobs.into_iter().zip(outputs) {
                    let _ = job.reply.send(Ok(out));
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "batch failed");
                for job in jobs {
                    let _ = job.reply.send(Err(e.clone()));
                }
            }
        }
    }
}
