//! The scheduler thread forms batches; executor threads run them. Executors announce
//! that they are idle on `idle`, and the scheduler keeps growing the current batch until
//! one is: a batch is sealed only when it is full or when it can start at once, so
//! requests never sit in a sealed, half-empty batch while a fuller one could form.

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, select};

use crate::{BatchError, BatchStats, BatcherConfig, Executor, ExecutorError, Job};

struct Batch<E: Executor> {
    jobs: Vec<Job<E>>,
    items: usize,
}

type Threads = Vec<JoinHandle<()>>;

pub(crate) fn start<E, F>(
    config: &BatcherConfig,
    factory: F,
    stats: Arc<BatchStats>,
) -> Result<(Sender<Job<E>>, Threads), BatchError>
where
    E: Executor,
    F: Fn(usize) -> Result<E, ExecutorError> + Send + Sync + 'static,
{
    let (submit_tx, submit_rx) = crossbeam_channel::unbounded::<Job<E>>();
    let (batch_tx, batch_rx) = crossbeam_channel::unbounded::<Batch<E>>();
    let (idle_tx, idle_rx) = crossbeam_channel::unbounded::<()>();
    let (ready_tx, ready_rx) = crossbeam_channel::unbounded::<Result<(), BatchError>>();
    let factory = Arc::new(factory);

    let mut threads = Vec::with_capacity(config.instance_count + 1);
    for index in 0..config.instance_count {
        let (factory, batch_rx, idle_tx, ready_tx) =
            (Arc::clone(&factory), batch_rx.clone(), idle_tx.clone(), ready_tx.clone());
        let stats = Arc::clone(&stats);
        let spawned =
            std::thread::Builder::new().name(format!("kiln-exec-{index}")).spawn(move || match factory(index) {
                Ok(executor) => {
                    let _ = ready_tx.send(Ok(()));
                    drop(ready_tx);
                    run_executor(executor, &batch_rx, &idle_tx, &stats);
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
        .spawn(move || schedule(&config, &submit_rx, &batch_tx, &idle_rx, &stats))
        .map_err(|e| BatchError::Startup { index: 0, reason: e.to_string() })?;
    threads.push(scheduler);
    Ok((submit_tx, threads))
}

/// Adds `job` to `batch` if it fits; otherwise hands it back to start the next batch.
fn admit<E: Executor>(batch: &mut Batch<E>, job: Job<E>, max: usize, stats: &BatchStats) -> Option<Job<E>> {
    if job.is_cancelled() {
        stats.record_cancelled();
        return None;
    }
    if batch.items + job.items > max {
        return Some(job);
    }
    batch.items += job.items;
    batch.jobs.push(job);
    None
}

fn schedule<E: Executor>(
    config: &BatcherConfig,
    submit: &Receiver<Job<E>>,
    batches: &Sender<Batch<E>>,
    idle: &Receiver<()>,
    stats: &BatchStats,
) {
    let max = config.max_batch_size;
    let mut carry: Option<Job<E>> = None;
    let mut closed = false;
    loop {
        let first = match carry.take() {
            Some(job) => job,
            None if closed => break,
            None => match submit.recv() {
                Ok(job) => job,
                Err(_) => break,
            },
        };
        let deadline = first.enqueued + config.max_queue_delay;
        if first.is_cancelled() {
            stats.record_cancelled();
            continue;
        }
        // `infer` rejects requests larger than `max_batch_size`, so a lone job always fits.
        let mut batch = Batch { items: first.items, jobs: Vec::with_capacity(max) };
        batch.jobs.push(first);
        // Phase 1: fill until full or until the oldest request's delay runs out.
        while batch.items < max && carry.is_none() && !closed {
            match submit.recv_deadline(deadline) {
                Ok(job) => carry = admit(&mut batch, job, max, stats),
                Err(RecvTimeoutError::Timeout) => break,
                Err(RecvTimeoutError::Disconnected) => closed = true,
            }
        }
        // Phase 2: wait for a free executor, still growing the batch while it can grow.
        loop {
            if batch.items >= max || carry.is_some() || closed {
                if idle.recv().is_err() {
                    return fail_all(batch, carry);
                }
                break;
            }
            select! {
                recv(idle) -> token => {
                    if token.is_err() {
                        return fail_all(batch, carry);
                    }
                    break;
                }
                recv(submit) -> job => match job {
                    Ok(job) => carry = admit(&mut batch, job, max, stats),
                    Err(_) => closed = true,
                },
            }
        }
        if let Err(e) = batches.send(batch) {
            return fail_all(e.0, carry);
        }
    }
}

/// Every executor is gone: answer whatever is left instead of leaving clients waiting.
fn fail_all<E: Executor>(batch: Batch<E>, carry: Option<Job<E>>) {
    for job in batch.jobs.into_iter().chain(carry) {
        let _ = job.reply.send(Err(BatchError::Lost));
    }
}

fn run_executor<E: Executor>(mut executor: E, batches: &Receiver<Batch<E>>, idle: &Sender<()>, stats: &BatchStats) {
    loop {
        // A send error means the scheduler is gone; still drain the batches it sealed.
        let _ = idle.send(());
        let Ok(batch) = batches.recv() else { return };
        let started = Instant::now();
        let mut all = batch.jobs;
        for job in &mut all {
            job.slot.release();
        }
        let (jobs, cancelled): (Vec<_>, Vec<_>) = all.into_iter().partition(|j| !j.is_cancelled());
        for _ in &cancelled {
            stats.record_cancelled();
        }
        if jobs.is_empty() {
            continue;
        }
        let items: usize = jobs.iter().map(|j| j.items).sum();
        let queue_time = jobs.iter().map(|j| started.saturating_duration_since(j.enqueued)).sum();
        let inputs: Vec<&E::Input> = jobs.iter().map(|j| &j.input).collect();
        let result = executor.execute(&inputs);
        drop(inputs);
        let outcome = match result {
            Ok(outputs) if outputs.len() == jobs.len() => Ok(outputs),
            Ok(outputs) => Err(BatchError::Execution(format!(
                "executor returned {} outputs for {} requests",
                outputs.len(),
                jobs.len()
            ))),
            Err(e) => Err(BatchError::Execution(e.0)),
        };
        stats.record_batch(jobs.len(), items, queue_time, started.elapsed(), outcome.is_ok());
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
