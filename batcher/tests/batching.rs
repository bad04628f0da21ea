//! End-to-end tests of the dynamic batcher with fake executors.
//!
//! Every wait on something the batcher must do is bounded (gates, barriers and polls
//! time out), so a broken batcher fails these tests instead of hanging them.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use kiln_batcher::{BatchError, Batcher, BatcherConfig, Executor, ExecutorError, Payload};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

mod common;
use common::{BLOCK_LIMIT, Gate, OpenOnDrop, lock};

type TestResult = Result<(), Box<dyn std::error::Error>>;

/// How long a test polls for a state the batcher must reach.
const POLL_LIMIT: Duration = Duration::from_secs(2);

/// A request: its identity and how many batch items it carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Req {
    id: u64,
    items: usize,
}

impl Payload for Req {
    fn items(&self) -> usize {
        self.items
    }
}

/// What the fake executor answers: the request's id once per item, and the total
/// number of items in the batch it was executed in.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Answer {
    ids: Vec<u64>,
    batch_items: usize,
}

/// A barrier whose wait times out instead of deadlocking.
#[derive(Debug)]
struct TimedBarrier {
    parties: usize,
    arrived: Mutex<usize>,
    cv: Condvar,
}

impl TimedBarrier {
    fn new(parties: usize) -> Self {
        Self { parties, arrived: Mutex::new(0), cv: Condvar::new() }
    }

    /// True if all parties arrived within `BLOCK_LIMIT`.
    fn arrive_and_wait(&self) -> bool {
        let mut guard = lock(&self.arrived);
        *guard += 1;
        self.cv.notify_all();
        let (guard, _) = self
            .cv
            .wait_timeout_while(guard, BLOCK_LIMIT, |n| *n < self.parties)
            .unwrap_or_else(PoisonError::into_inner);
        *guard >= self.parties
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
enum Mode {
    /// One correct answer per input.
    #[default]
    Echo,
    /// Every batch fails.
    Fail,
    /// One output too few.
    DropOne,
}

/// One executed batch: the `(id, items)` of its inputs, in order.
type BatchLog = Vec<(u64, usize)>;

/// How the fake executors behave, shared by every instance.
#[derive(Debug, Clone, Default)]
struct Spec {
    /// Every executed batch.
    log: Arc<Mutex<Vec<BatchLog>>>,
    /// Told the ids of every batch as it starts executing.
    started: Option<mpsc::UnboundedSender<Vec<u64>>>,
    /// Waited on before answering.
    gate: Option<Arc<Gate>>,
    /// Waited on before answering.
    barrier: Option<Arc<TimedBarrier>>,
    /// Slept before answering.
    delay: Duration,
    mode: Mode,
}

impl Spec {
    fn batches(&self) -> Vec<BatchLog> {
        lock(&self.log).clone()
    }

    fn executed_ids(&self) -> Vec<u64> {
        self.batches().iter().flatten().map(|&(id, _)| id).collect()
    }
}

#[derive(Debug)]
struct FakeExecutor {
    spec: Spec,
}

impl Executor for FakeExecutor {
    type Input = Req;
    type Output = Answer;

    fn execute(&mut self, inputs: &[&Req]) -> Result<Vec<Answer>, ExecutorError> {
        let seen: Vec<(u64, usize)> = inputs.iter().map(|r| (r.id, r.items)).collect();
        let batch_items = seen.iter().map(|&(_, items)| items).sum();
        lock(&self.spec.log).push(seen);
        if let Some(started) = &self.spec.started {
            let _ = started.send(inputs.iter().map(|r| r.id).collect());
        }
        if let Some(barrier) = &self.spec.barrier
            && !barrier.arrive_and_wait()
        {
            return Err(ExecutorError("barrier timed out: batches did not run concurrently".into()));
        }
        if let Some(gate) = &self.spec.gate
            && !gate.wait()
        {
            return Err(ExecutorError("gate never opened".into()));
        }
        if !self.spec.delay.is_zero() {
            std::thread::sleep(self.spec.delay);
        }
        let mut outputs: Vec<Answer> =
            inputs.iter().map(|r| Answer { ids: vec![r.id; r.items], batch_items }).collect();
        match self.spec.mode {
            Mode::Echo => Ok(outputs),
            Mode::Fail => Err(ExecutorError("boom".into())),
            Mode::DropOne => {
                outputs.pop();
                Ok(outputs)
            }
        }
    }
}

fn config(max_batch_size: usize, max_queue_size: usize, instance_count: usize, delay_ms: u64) -> BatcherConfig {
    BatcherConfig {
        max_batch_size,
        max_queue_delay: Duration::from_millis(delay_ms),
        max_queue_size,
        instance_count,
        ..BatcherConfig::default()
    }
}

fn start(config: BatcherConfig, spec: &Spec) -> Result<Arc<Batcher<FakeExecutor>>, BatchError> {
    let spec = spec.clone();
    Batcher::spawn(config, move |_| Ok(FakeExecutor { spec: spec.clone() })).map(Arc::new)
}

fn submit(batcher: &Arc<Batcher<FakeExecutor>>, id: u64, items: usize) -> JoinHandle<Result<Answer, BatchError>> {
    let batcher = Arc::clone(batcher);
    tokio::spawn(async move { batcher.infer(Req { id, items }).await })
}

fn ok_answer(id: u64, items: usize, batch_items: usize) -> Answer {
    Answer { ids: vec![id; items], batch_items }
}

/// Polls `cond` every millisecond until it holds; errors after `POLL_LIMIT`.
async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) -> TestResult {
    let deadline = Instant::now() + POLL_LIMIT;
    while !cond() {
        if Instant::now() > deadline {
            return Err(format!("timed out waiting until {what}").into());
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    Ok(())
}

/// Waits (bounded) for the next batch to start executing and returns its ids.
async fn next_started(started: &mut mpsc::UnboundedReceiver<Vec<u64>>) -> Result<Vec<u64>, Box<dyn std::error::Error>> {
    tokio::time::timeout(POLL_LIMIT, started.recv()).await?.ok_or_else(|| "executor went away".into())
}

/// Awaits a task's answer, bounded.
async fn join(
    handle: JoinHandle<Result<Answer, BatchError>>,
) -> Result<Result<Answer, BatchError>, Box<dyn std::error::Error>> {
    Ok(tokio::time::timeout(POLL_LIMIT, handle).await??)
}

/// A gated executor that reports batch starts: the setup of the blocking tests.
fn gated_spec() -> (Spec, Arc<Gate>, mpsc::UnboundedReceiver<Vec<u64>>) {
    let gate = Arc::new(Gate::default());
    let (tx, rx) = mpsc::unbounded_channel();
    let spec = Spec { started: Some(tx), gate: Some(Arc::clone(&gate)), ..Spec::default() };
    (spec, gate, rx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_requests_get_their_own_answers_and_batches_respect_the_limit() -> TestResult {
    const MAX: usize = 8;
    const REQUESTS: u64 = 64;
    let spec = Spec { delay: Duration::from_millis(1), ..Spec::default() };
    let batcher = start(config(MAX, 1024, 2, 1), &spec)?;

    let mut expected = HashMap::new();
    let mut handles = Vec::new();
    for id in 0..REQUESTS {
        // A deterministic mix of 1..=4 items.
        let items = usize::try_from((id.wrapping_mul(2_654_435_761) >> 7) % 4)? + 1;
        expected.insert(id, items);
        handles.push((id, items, submit(&batcher, id, items)));
    }
    for (id, items, handle) in handles {
        let answer = join(handle).await??;
        assert_eq!(answer.ids, vec![id; items], "request {id} got someone else's answer");
        assert!(answer.batch_items >= items && answer.batch_items <= MAX, "request {id}: {answer:?}");
    }

    let total_items: usize = expected.values().sum();
    let batches = spec.batches();
    for batch in &batches {
        let items: usize = batch.iter().map(|&(_, items)| items).sum();
        assert!(items <= MAX, "a batch of {items} items exceeds max_batch_size {MAX}: {batch:?}");
    }
    assert!(batches.iter().any(|b| b.len() > 1), "no batch ever held more than one request: {batches:?}");
    let executed: usize = batches.iter().flatten().map(|&(_, items)| items).sum();
    assert_eq!(executed, total_items, "items executed != items submitted");

    // Every request executed exactly once, with its own item count.
    let mut seen = HashMap::new();
    for &(id, items) in batches.iter().flatten() {
        assert!(seen.insert(id, items).is_none(), "request {id} executed twice");
    }
    assert_eq!(seen, expected);

    let stats = batcher.stats();
    assert_eq!(stats.requests, REQUESTS);
    assert_eq!(stats.items, u64::try_from(total_items)?);
    assert_eq!(stats.batches, u64::try_from(batches.len())?);
    assert_eq!(stats.queued_now, 0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_requests_are_batched_together() -> TestResult {
    let spec = Spec { delay: Duration::from_millis(5), ..Spec::default() };
    let batcher = start(config(8, 1024, 1, 2), &spec)?;

    let handles: Vec<_> = (0..32).map(|id| submit(&batcher, id, 1)).collect();
    for (id, handle) in (0..).zip(handles) {
        let answer = join(handle).await??;
        assert_eq!(answer.ids, vec![id]);
    }

    let stats = batcher.stats();
    assert_eq!(stats.requests, 32);
    assert_eq!(stats.items, 32);
    assert!(stats.mean_batch_items() > 1.0, "no batching happened: {stats:?}");
    assert!(spec.batches().iter().all(|b| b.len() <= 8));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_item_counts_are_refused() -> TestResult {
    let spec = Spec::default();
    let batcher = start(config(8, 16, 1, 1), &spec)?;

    // `Req` cannot be split, so a request above max_batch_size is refused.
    let too_many = batcher.infer(Req { id: 1, items: 9 }).await;
    assert!(matches!(too_many, Err(BatchError::BadItemCount { items: 9, .. })), "{too_many:?}");
    let none = batcher.infer(Req { id: 2, items: 0 }).await;
    assert!(matches!(none, Err(BatchError::BadItemCount { items: 0, .. })), "{none:?}");
    // The boundary is accepted.
    assert_eq!(batcher.infer(Req { id: 3, items: 8 }).await?, ok_answer(3, 8, 8));

    assert_eq!(spec.executed_ids(), vec![3], "a refused request reached the executor");
    let stats = batcher.stats();
    assert_eq!(stats.requests, 1);
    assert_eq!(stats.queued_now, 0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_queue_refuses_at_once_and_admitted_requests_complete() -> TestResult {
    let (spec, gate, mut started) = gated_spec();
    let batcher = start(config(1, 4, 1, 1), &spec)?;
    let _open = OpenOnDrop(Arc::clone(&gate));

    // Request 0 occupies the only executor (it no longer counts as queued)...
    let first = submit(&batcher, 0, 1);
    assert_eq!(next_started(&mut started).await?, vec![0]);
    // ...and four more fill the queue.
    let queued: Vec<_> = (1..=4).map(|id| submit(&batcher, id, 1)).collect();
    wait_until("four requests are queued", || batcher.stats().queued_now == 4).await?;

    for id in 10..13 {
        let refused = tokio::time::timeout(POLL_LIMIT, batcher.infer(Req { id, items: 1 })).await?;
        assert_eq!(refused, Err(BatchError::QueueFull(4)));
    }
    assert_eq!(batcher.stats().rejected, 3);

    gate.open();
    assert_eq!(join(first).await??, ok_answer(0, 1, 1));
    for (id, handle) in (1..).zip(queued) {
        assert_eq!(join(handle).await??, ok_answer(id, 1, 1));
    }
    let mut executed = spec.executed_ids();
    executed.sort_unstable();
    assert_eq!(executed, vec![0, 1, 2, 3, 4], "a refused request was executed");

    // The slots are free again.
    assert_eq!(batcher.stats().queued_now, 0);
    assert_eq!(batcher.infer(Req { id: 20, items: 1 }).await?, ok_answer(20, 1, 1));
    assert_eq!(batcher.stats().rejected, 3);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dropped_request_is_never_executed() -> TestResult {
    let (spec, gate, mut started) = gated_spec();
    let batcher = start(config(4, 16, 1, 1), &spec)?;
    let _open = OpenOnDrop(Arc::clone(&gate));

    let first = submit(&batcher, 0, 1);
    assert_eq!(next_started(&mut started).await?, vec![0]);

    // Queued behind the blocked executor, then abandoned by its client.
    let abandoned = tokio::time::timeout(Duration::from_millis(20), batcher.infer(Req { id: 666, items: 1 })).await;
    assert!(abandoned.is_err(), "the request should still have been waiting: {abandoned:?}");

    gate.open();
    assert_eq!(join(first).await??, ok_answer(0, 1, 1));
    // A later request completes, so the abandoned one has been dealt with by now.
    assert_eq!(batcher.infer(Req { id: 1, items: 1 }).await?.ids, vec![1]);

    assert!(!spec.executed_ids().contains(&666), "the executor ran a cancelled request: {:?}", spec.batches());
    let stats = batcher.stats();
    assert!(stats.cancelled >= 1, "{stats:?}");
    assert_eq!(stats.requests, 2);
    assert_eq!(stats.queued_now, 0, "the cancelled request kept its queue slot: {stats:?}");
    Ok(())
}

/// A request abandoned while it still waits in the submission channel (the scheduler
/// is holding a full batch until an executor frees up) must give its queue slot back;
/// otherwise each such cancellation would shrink `max_queue_size` for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_request_cancelled_before_the_scheduler_sees_it_frees_its_queue_slot() -> TestResult {
    let (spec, gate, mut started) = gated_spec();
    // max_batch_size 1: the scheduler seals every request alone and then blocks until an
    // executor is idle, so later requests stay in the submission channel meanwhile.
    let batcher = start(config(1, 2, 1, 1), &spec)?;
    let _open = OpenOnDrop(Arc::clone(&gate));

    let first = submit(&batcher, 0, 1);
    assert_eq!(next_started(&mut started).await?, vec![0]);
    let second = submit(&batcher, 1, 1);
    wait_until("request 1 is queued", || batcher.stats().queued_now == 1).await?;
    let abandoned = tokio::time::timeout(Duration::from_millis(20), batcher.infer(Req { id: 666, items: 1 })).await;
    assert!(abandoned.is_err(), "the request should still have been waiting: {abandoned:?}");

    gate.open();
    assert_eq!(join(first).await??, ok_answer(0, 1, 1));
    assert_eq!(join(second).await??, ok_answer(1, 1, 1));
    wait_until("the cancellation is noticed", || batcher.stats().cancelled == 1).await?;
    assert!(!spec.executed_ids().contains(&666));

    // Nothing is queued any more, and both slots must be usable again.
    let stats = batcher.stats();
    assert_eq!(stats.queued_now, 0, "a cancelled request still holds a queue slot: {stats:?}");
    let both: Vec<_> = (2..4).map(|id| submit(&batcher, id, 1)).collect();
    for (id, handle) in (2..).zip(both) {
        assert_eq!(join(handle).await??, ok_answer(id, 1, 1));
    }
    Ok(())
}

type Pending = Pin<Box<dyn Future<Output = Result<Answer, BatchError>> + Send>>;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shutdown_drains_admitted_requests_and_refuses_new_ones() -> TestResult {
    let (mut spec, gate, mut started) = gated_spec();
    spec.delay = Duration::from_millis(1);
    let batcher = start(config(2, 1024, 1, 1), &spec)?;
    let _open = OpenOnDrop(Arc::clone(&gate));

    let first = submit(&batcher, 0, 1);
    assert_eq!(next_started(&mut started).await?, vec![0]);
    let queued: Vec<_> = (1..=8).map(|id| submit(&batcher, id, 1)).collect();
    wait_until("eight requests are queued", || batcher.stats().queued_now == 8).await?;

    let shutting = {
        let batcher = Arc::clone(&batcher);
        tokio::task::spawn_blocking(move || batcher.shutdown())
    };
    // Probe (one synchronous poll each) until admission has stopped. A probe admitted
    // before that is an ordinary admitted request: it must be answered too.
    let mut admitted_probes: Vec<(u64, Pending)> = Vec::new();
    let deadline = Instant::now() + POLL_LIMIT;
    for id in 100.. {
        let b = Arc::clone(&batcher);
        let mut probe: Pending = Box::pin(async move { b.infer(Req { id, items: 1 }).await });
        match probe.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
            Poll::Ready(refused) => {
                assert_eq!(refused, Err(BatchError::ShuttingDown));
                break;
            }
            Poll::Pending => admitted_probes.push((id, probe)),
        }
        if Instant::now() > deadline {
            return Err("shutdown never stopped admission".into());
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert!(!shutting.is_finished(), "shutdown returned while requests were still blocked");

    gate.open();
    assert_eq!(join(first).await??, ok_answer(0, 1, 1));
    for (id, handle) in (1..).zip(queued) {
        assert_eq!(join(handle).await??.ids, vec![id], "admitted request {id} was not answered");
    }
    for (id, probe) in admitted_probes {
        assert_eq!(tokio::time::timeout(POLL_LIMIT, probe).await??.ids, vec![id]);
    }
    tokio::time::timeout(POLL_LIMIT, shutting).await??;

    assert_eq!(batcher.infer(Req { id: 999, items: 1 }).await, Err(BatchError::ShuttingDown));
    assert!(!spec.executed_ids().contains(&999));
    assert_eq!(batcher.stats().queued_now, 0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn executor_errors_fail_every_request_of_the_batch() -> TestResult {
    let spec = Spec { mode: Mode::Fail, delay: Duration::from_millis(2), ..Spec::default() };
    let batcher = start(config(8, 64, 1, 2), &spec)?;
    let handles: Vec<_> = (0..6).map(|id| submit(&batcher, id, 1)).collect();
    for handle in handles {
        assert_eq!(join(handle).await?, Err(BatchError::Execution("boom".into())));
    }
    let stats = batcher.stats();
    assert_eq!(stats.requests, 6);
    assert!(stats.batches >= 1);
    assert_eq!(stats.failed_batches, stats.batches);

    // Still serving after failures.
    assert_eq!(batcher.infer(Req { id: 7, items: 1 }).await, Err(BatchError::Execution("boom".into())));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_wrong_number_of_outputs_is_an_execution_error() -> TestResult {
    let spec = Spec { mode: Mode::DropOne, delay: Duration::from_millis(2), ..Spec::default() };
    let batcher = start(config(8, 64, 1, 2), &spec)?;
    let handles: Vec<_> = (0..6).map(|id| submit(&batcher, id, 2)).collect();
    for handle in handles {
        match join(handle).await? {
            Err(BatchError::Execution(msg)) => assert!(msg.contains("outputs"), "unexpected message {msg:?}"),
            other => return Err(format!("expected an execution error, got {other:?}").into()),
        }
    }
    let stats = batcher.stats();
    assert_eq!(stats.failed_batches, stats.batches);
    assert!(stats.batches >= 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failing_factory_fails_spawn() -> TestResult {
    let built = Arc::new(Mutex::new(Vec::new()));
    let record = Arc::clone(&built);
    let spawned = Batcher::spawn(config(4, 16, 2, 1), move |index| {
        lock(&record).push(index);
        if index == 1 { Err(ExecutorError("no device 1".into())) } else { Ok(FakeExecutor { spec: Spec::default() }) }
    });
    match spawned {
        Err(BatchError::Startup { index, reason }) => {
            assert_eq!(index, 1);
            assert_eq!(reason, "no device 1");
        }
        Err(other) => return Err(format!("expected a startup error, got {other:?}").into()),
        Ok(_) => return Err("spawn succeeded although executor 1 failed".into()),
    }
    let mut indices = lock(&built).clone();
    indices.sort_unstable();
    assert_eq!(indices, vec![0, 1], "the factory must be called once per instance");

    // An invalid configuration is refused as well.
    let invalid = Batcher::spawn(config(4, 16, 0, 1), |_| Ok(FakeExecutor { spec: Spec::default() }));
    assert!(matches!(invalid, Err(BatchError::Startup { index: 0, .. })), "{invalid:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_instances_execute_batches_concurrently() -> TestResult {
    // Each batch waits at a barrier for the other: only concurrent execution passes it.
    let spec = Spec { barrier: Some(Arc::new(TimedBarrier::new(2))), ..Spec::default() };
    // max_batch_size 1 forces the two requests into two batches.
    let batcher = start(config(1, 16, 2, 1), &spec)?;
    let a = submit(&batcher, 1, 1);
    let b = submit(&batcher, 2, 1);
    let limit = BLOCK_LIMIT + POLL_LIMIT;
    assert_eq!(tokio::time::timeout(limit, a).await??, Ok(ok_answer(1, 1, 1)));
    assert_eq!(tokio::time::timeout(limit, b).await??, Ok(ok_answer(2, 1, 1)));
    assert_eq!(spec.batches().len(), 2);
    Ok(())
}
