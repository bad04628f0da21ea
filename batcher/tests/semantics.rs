//! Behavioural tests of the batcher's scheduling semantics: deadlines, priorities and
//! aging, preferred batch sizes, split/join of oversize requests, the adaptive queue
//! delay, the observer hook and shutdown.
//!
//! Every wait on something the batcher must do is bounded (gates and polls time out),
//! so a broken batcher fails these tests instead of hanging them.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use kiln_batcher::{
    BatchError, BatchObserver, BatchRecord, Batcher, BatcherConfig, Executor, ExecutorError, InferOptions, Payload,
};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

mod common;
use common::{Gate, OpenOnDrop, lock};

type TestResult = Result<(), Box<dyn std::error::Error>>;

/// How long a test waits for something the batcher must do.
const POLL_LIMIT: Duration = Duration::from_secs(2);

const fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// A request: one id per batch item. Splits into consecutive runs of ids.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Items(Vec<u64>);

impl Payload for Items {
    fn items(&self) -> usize {
        self.0.len()
    }

    fn split(self, sizes: &[usize]) -> Result<Vec<Self>, ExecutorError> {
        let mut rest = self.0.as_slice();
        let mut parts = Vec::with_capacity(sizes.len());
        for &n in sizes {
            if n > rest.len() {
                return Err(ExecutorError(format!("cannot take {n} items from {}", rest.len())));
            }
            let (part, tail) = rest.split_at(n);
            parts.push(Items(part.to_vec()));
            rest = tail;
        }
        if !rest.is_empty() {
            return Err(ExecutorError(format!("{} items left over", rest.len())));
        }
        Ok(parts)
    }
}

/// A single-item request.
fn one(id: u64) -> Items {
    Items(vec![id])
}

/// One executed batch: the ids of each of its inputs, in order.
type BatchLog = Vec<Vec<u64>>;

/// How the fake executors behave, shared by every instance.
#[derive(Debug, Clone, Default)]
struct Spec {
    log: Arc<Mutex<Vec<BatchLog>>>,
    /// Told the first id of every input of each batch as it starts executing.
    started: Option<mpsc::UnboundedSender<Vec<u64>>>,
    gate: Option<Arc<Gate>>,
    /// Fixed cost of a batch.
    delay: Duration,
    /// Extra cost per batch item.
    per_item: Duration,
}

impl Spec {
    fn batches(&self) -> Vec<BatchLog> {
        lock(&self.log).clone()
    }

    /// The first id of every executed input, in execution order.
    fn executed_ids(&self) -> Vec<u64> {
        self.batches().iter().flatten().filter_map(|ids| ids.first().copied()).collect()
    }

    fn batch_items(&self) -> Vec<usize> {
        self.batches().iter().map(|b| b.iter().map(Vec::len).sum()).collect()
    }
}

#[derive(Debug)]
struct FakeExecutor {
    spec: Spec,
}

impl Executor for FakeExecutor {
    type Input = Items;
    type Output = Vec<u64>;

    fn execute(&mut self, inputs: &[&Items]) -> Result<Vec<Vec<u64>>, ExecutorError> {
        let seen: BatchLog = inputs.iter().map(|r| r.0.clone()).collect();
        let items: usize = seen.iter().map(Vec::len).sum();
        lock(&self.spec.log).push(seen);
        if let Some(started) = &self.spec.started {
            let _ = started.send(inputs.iter().filter_map(|r| r.0.first().copied()).collect());
        }
        if let Some(gate) = &self.spec.gate
            && !gate.wait()
        {
            return Err(ExecutorError("gate never opened".into()));
        }
        let cost = self.spec.delay + self.spec.per_item * u32::try_from(items).unwrap_or(u32::MAX);
        if !cost.is_zero() {
            std::thread::sleep(cost);
        }
        Ok(inputs.iter().map(|r| r.0.clone()).collect())
    }

    fn join(parts: Vec<Vec<u64>>) -> Result<Vec<u64>, ExecutorError> {
        Ok(parts.concat())
    }
}

fn config(max_batch_size: usize, max_queue_size: usize, instance_count: usize, delay: Duration) -> BatcherConfig {
    BatcherConfig { max_batch_size, max_queue_delay: delay, max_queue_size, instance_count, ..BatcherConfig::default() }
}

fn start(config: BatcherConfig, spec: &Spec) -> Result<Arc<Batcher<FakeExecutor>>, BatchError> {
    let spec = spec.clone();
    Batcher::spawn(config, move |_| Ok(FakeExecutor { spec: spec.clone() })).map(Arc::new)
}

type Answer = Result<Vec<u64>, BatchError>;

fn submit_with(batcher: &Arc<Batcher<FakeExecutor>>, input: Items, options: InferOptions) -> JoinHandle<Answer> {
    let batcher = Arc::clone(batcher);
    tokio::spawn(async move { batcher.infer_with(input, options).await })
}

fn submit(batcher: &Arc<Batcher<FakeExecutor>>, id: u64) -> JoinHandle<Answer> {
    submit_with(batcher, one(id), InferOptions::default())
}

fn priority(p: u32) -> InferOptions {
    InferOptions { priority: Some(p), ..InferOptions::default() }
}

fn timeout(t: Duration) -> InferOptions {
    InferOptions { timeout: Some(t), ..InferOptions::default() }
}

/// Polls `cond` every millisecond until it holds; errors after `POLL_LIMIT`.
async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) -> TestResult {
    let deadline = Instant::now() + POLL_LIMIT;
    while !cond() {
        if Instant::now() > deadline {
            return Err(format!("timed out waiting until {what}").into());
        }
        tokio::time::sleep(ms(1)).await;
    }
    Ok(())
}

/// Waits (bounded) for the next batch to start executing and returns its ids.
async fn next_started(started: &mut mpsc::UnboundedReceiver<Vec<u64>>) -> Result<Vec<u64>, Box<dyn std::error::Error>> {
    tokio::time::timeout(POLL_LIMIT, started.recv()).await?.ok_or_else(|| "executor went away".into())
}

/// Awaits a task's answer, bounded.
async fn join(handle: JoinHandle<Answer>) -> Result<Answer, Box<dyn std::error::Error>> {
    Ok(tokio::time::timeout(POLL_LIMIT, handle).await??)
}

/// A gated executor that reports batch starts: the setup of the blocking tests.
fn gated_spec() -> (Spec, Arc<Gate>, mpsc::UnboundedReceiver<Vec<u64>>) {
    let gate = Arc::new(Gate::default());
    let (tx, rx) = mpsc::unbounded_channel();
    let spec = Spec { started: Some(tx), gate: Some(Arc::clone(&gate)), ..Spec::default() };
    (spec, gate, rx)
}

/// Shuts the batcher down on a blocking thread.
fn shutdown_in_background(batcher: &Arc<Batcher<FakeExecutor>>) -> JoinHandle<()> {
    let batcher = Arc::clone(batcher);
    tokio::task::spawn_blocking(move || batcher.shutdown())
}

// ---------------------------------------------------------------------------------
// Deadlines
// ---------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_queued_request_times_out_at_its_deadline_and_is_never_executed() -> TestResult {
    let (spec, gate, mut started) = gated_spec();
    let batcher = start(config(1, 16, 1, ms(1)), &spec)?;
    let _open = OpenOnDrop(Arc::clone(&gate));

    let first = submit(&batcher, 0);
    assert_eq!(next_started(&mut started).await?, vec![0]);

    let submitted = Instant::now();
    let answer = tokio::time::timeout(POLL_LIMIT, batcher.infer_with(one(1), timeout(ms(50)))).await;
    let waited = submitted.elapsed();
    assert_eq!(answer?, Err(BatchError::Timeout));
    assert!(waited >= ms(50), "answered Timeout before the deadline: {waited:?}");
    assert!(waited < ms(1000), "Timeout came long after the 50 ms deadline: {waited:?}");
    let stats = batcher.stats();
    assert!(stats.expired >= 1, "{stats:?}");
    assert_eq!(stats.queued_now, 0, "the expired request kept its queue slot: {stats:?}");

    gate.open();
    assert_eq!(join(first).await??, vec![0]);
    // A later request completes, so the scheduler has dealt with the expired one by now.
    assert_eq!(tokio::time::timeout(POLL_LIMIT, batcher.infer(one(2))).await??, vec![2]);
    assert_eq!(spec.executed_ids(), vec![0, 2], "the expired request was executed");
    let stats = batcher.stats();
    assert_eq!(stats.requests, 2);
    assert_eq!(stats.expired, 1);
    assert_eq!(stats.queued_now, 0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_default_timeout_applies_to_requests_that_set_none() -> TestResult {
    let (spec, gate, mut started) = gated_spec();
    let cfg = BatcherConfig { default_timeout: Some(ms(50)), ..config(1, 16, 1, ms(1)) };
    let batcher = start(cfg, &spec)?;
    let _open = OpenOnDrop(Arc::clone(&gate));

    // Request 0 starts at once; it is still executing when its own deadline passes.
    let first = submit(&batcher, 0);
    assert_eq!(next_started(&mut started).await?, vec![0]);

    let submitted = Instant::now();
    let answer = tokio::time::timeout(POLL_LIMIT, batcher.infer(one(1))).await?;
    let waited = submitted.elapsed();
    assert_eq!(answer, Err(BatchError::Timeout));
    assert!(waited >= ms(50) && waited < ms(1000), "{waited:?}");
    // An explicit timeout overrides the default.
    let long = submit_with(&batcher, one(2), timeout(Duration::from_secs(30)));
    wait_until("request 2 is queued", || batcher.stats().queued_now == 1).await?;
    tokio::time::sleep(ms(80)).await;
    assert!(!long.is_finished(), "the default timeout overrode the request's own");

    gate.open();
    // Request 0 started before its deadline, so it is answered although the deadline passed.
    assert_eq!(join(first).await??, vec![0]);
    assert_eq!(join(long).await??, vec![2]);
    assert_eq!(spec.executed_ids(), vec![0, 2]);
    let stats = batcher.stats();
    assert_eq!(stats.expired, 1, "{stats:?}");
    assert_eq!(stats.queued_now, 0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_request_already_executing_at_its_deadline_still_gets_its_answer() -> TestResult {
    let (tx, mut started) = mpsc::unbounded_channel();
    let spec = Spec { started: Some(tx), delay: ms(150), ..Spec::default() };
    let batcher = start(config(4, 16, 1, Duration::ZERO), &spec)?;

    let submitted = Instant::now();
    let handle = submit_with(&batcher, one(7), timeout(ms(30)));
    assert_eq!(next_started(&mut started).await?, vec![7]);
    assert!(submitted.elapsed() < ms(30), "the request did not start before its deadline; test setup is off");
    assert_eq!(join(handle).await??, vec![7]);
    assert!(submitted.elapsed() >= ms(150));
    let stats = batcher.stats();
    assert_eq!(stats.expired, 0, "{stats:?}");
    assert_eq!(stats.requests, 1);
    assert_eq!(stats.queued_now, 0);
    Ok(())
}

type Pending = Pin<Box<dyn Future<Output = Answer> + Send>>;

/// The executor skips a request whose deadline passed before its batch started. If it
/// gets there before the client's timer has fired (tokio timers fire up to a tick late,
/// and a busy runtime polls late), it must answer `Timeout` itself: merely dropping the
/// job closes the reply channel and the client would see `Lost`. Here the client is
/// deliberately not polled between its deadline and the executor's check, which makes
/// that race deterministic.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_request_expired_by_the_executor_is_answered_timeout() -> TestResult {
    let (spec, gate, mut started) = gated_spec();
    let batcher = start(config(4, 16, 1, ms(1)), &spec)?;
    let _open = OpenOnDrop(Arc::clone(&gate));

    let first = submit(&batcher, 0);
    assert_eq!(next_started(&mut started).await?, vec![0]);

    // Admit the request with one synchronous poll, then leave it alone past its deadline.
    let b = Arc::clone(&batcher);
    let mut late: Pending = Box::pin(async move { b.infer_with(one(1), timeout(ms(20))).await });
    assert!(late.as_mut().poll(&mut Context::from_waker(Waker::noop())).is_pending());
    wait_until("request 1 is queued", || batcher.stats().queued_now == 1).await?;
    tokio::time::sleep(ms(60)).await;

    gate.open();
    assert_eq!(join(first).await??, vec![0]);
    wait_until("the executor expires request 1", || batcher.stats().expired == 1).await?;
    let answer = tokio::time::timeout(POLL_LIMIT, late).await?;
    assert!(!spec.executed_ids().contains(&1), "an expired request was executed");
    assert_eq!(answer, Err(BatchError::Timeout));
    Ok(())
}

// ---------------------------------------------------------------------------------
// Priorities and aging
// ---------------------------------------------------------------------------------

/// Ids 1..=6 with these priorities, submitted in id order.
const LEVELS: [u32; 6] = [3, 3, 2, 1, 2, 1];

/// Submits request 0 (which blocks the executor), then ids 1..=6 with `LEVELS`, 2 ms
/// apart so that arrival order is fixed, and waits until all six are queued.
async fn queue_behind_a_blocked_executor(
    batcher: &Arc<Batcher<FakeExecutor>>,
    started: &mut mpsc::UnboundedReceiver<Vec<u64>>,
) -> Result<Vec<JoinHandle<Answer>>, Box<dyn std::error::Error>> {
    let mut handles = vec![submit_with(batcher, one(0), priority(3))];
    assert_eq!(next_started(started).await?, vec![0]);
    for (id, level) in (1..).zip(LEVELS) {
        handles.push(submit_with(batcher, one(id), priority(level)));
        tokio::time::sleep(ms(2)).await;
    }
    wait_until("six requests are queued", || batcher.stats().queued_now == 6).await?;
    Ok(handles)
}

fn priority_config(max_batch_size: usize) -> BatcherConfig {
    BatcherConfig {
        priority_levels: 3,
        default_priority: 2,
        // Long enough that no request ages during the test.
        priority_aging: Duration::from_secs(10),
        ..config(max_batch_size, 64, 1, ms(1))
    }
}

/// With `max_batch_size` 1 every batch is one request, so execution order is scheduling
/// order. Expected: the running request, then level 1 (4, 6), level 2 (3, 5), level 3
/// (1, 2), FIFO within a level. Regression: requests that arrive while the scheduler
/// waits for an executor must compete by priority too, not queue behind what it held.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn higher_priority_requests_run_first_and_fifo_within_a_level() -> TestResult {
    let (spec, gate, mut started) = gated_spec();
    let batcher = start(priority_config(1), &spec)?;
    let _open = OpenOnDrop(Arc::clone(&gate));

    let handles = queue_behind_a_blocked_executor(&batcher, &mut started).await?;
    gate.open();
    for (id, handle) in (0..).zip(handles) {
        assert_eq!(join(handle).await??, vec![id]);
    }
    assert_eq!(spec.executed_ids(), vec![0, 4, 6, 3, 5, 1, 2]);
    Ok(())
}

/// The same queue with room for all six in one batch: the batch holds them in priority
/// order, FIFO within a level.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_batch_holds_its_requests_in_priority_order() -> TestResult {
    let (spec, gate, mut started) = gated_spec();
    let batcher = start(priority_config(8), &spec)?;
    let _open = OpenOnDrop(Arc::clone(&gate));

    let handles = queue_behind_a_blocked_executor(&batcher, &mut started).await?;
    gate.open();
    for (id, handle) in (0..).zip(handles) {
        assert_eq!(join(handle).await??, vec![id]);
    }
    let batches = spec.batches();
    assert_eq!(batches, vec![vec![vec![0]], vec![vec![4], vec![6], vec![3], vec![5], vec![1], vec![2]]]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn priorities_outside_the_levels_are_refused() -> TestResult {
    let spec = Spec::default();
    let batcher = start(priority_config(4), &spec)?;
    for given in [0, 4, u32::MAX] {
        let answer =
            tokio::time::timeout(POLL_LIMIT, batcher.infer_with(one(u64::from(given)), priority(given))).await?;
        assert_eq!(answer, Err(BatchError::BadPriority { given, levels: 3 }));
    }
    // Also for a request that is split.
    let answer = batcher.infer_with(Items((0..10).collect()), priority(9)).await;
    assert_eq!(answer, Err(BatchError::BadPriority { given: 9, levels: 3 }));
    // The bounds themselves are fine, and the default is used when none is given.
    for (id, options) in [(11, priority(1)), (12, priority(3)), (13, InferOptions::default())] {
        assert_eq!(tokio::time::timeout(POLL_LIMIT, batcher.infer_with(one(id), options)).await??, vec![id]);
    }
    assert_eq!(spec.executed_ids(), vec![11, 12, 13], "a refused request reached the executor");
    assert_eq!(batcher.stats().queued_now, 0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_low_priority_request_ages_and_is_not_starved() -> TestResult {
    const STREAM: Duration = Duration::from_millis(300);
    let spec = Spec { delay: ms(5), ..Spec::default() };
    let cfg = BatcherConfig { priority_levels: 2, priority_aging: ms(30), ..config(1, 4096, 1, ms(1)) };
    let batcher = start(cfg, &spec)?;

    // Level-1 requests every 2 ms (500/s) against 5 ms batches of one (200/s): the
    // level-1 queue never empties while the stream lasts.
    let stream = {
        let batcher = Arc::clone(&batcher);
        tokio::spawn(async move {
            let mut interval = tokio::time::interval(ms(2));
            let end = Instant::now() + STREAM;
            let mut handles = Vec::new();
            for id in 1000.. {
                interval.tick().await;
                if Instant::now() >= end {
                    break;
                }
                handles.push((id, submit_with(&batcher, one(id), priority(1))));
            }
            (handles, Instant::now())
        })
    };
    tokio::time::sleep(ms(10)).await;
    let submitted = Instant::now();
    let low = submit_with(&batcher, one(1), priority(2));
    let answer = tokio::time::timeout(POLL_LIMIT, low).await??;
    let done = Instant::now();
    assert_eq!(answer?, vec![1]);

    let (handles, stream_end) = tokio::time::timeout(POLL_LIMIT, stream).await??;
    let waited = done - submitted;
    assert!(done < stream_end, "the level-2 request waited for the whole level-1 stream: {waited:?}");
    // Priority did apply at first: it waited for newer level-1 requests until it aged.
    assert!(waited >= ms(20), "the level-2 request did not wait for level 1 at all: {waited:?}");
    assert!(handles.len() > 100, "the stream was too thin to test starvation: {}", handles.len());
    for (id, handle) in handles {
        assert_eq!(join(handle).await??, vec![id]);
    }
    assert_eq!(batcher.stats().queued_now, 0);
    Ok(())
}

// ---------------------------------------------------------------------------------
// Preferred batch sizes
// ---------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_preferred_size_is_dispatched_without_waiting_out_the_delay() -> TestResult {
    let spec = Spec::default();
    let cfg = BatcherConfig { preferred_batch_sizes: vec![4], ..config(8, 64, 1, Duration::from_secs(10)) };
    let batcher = start(cfg, &spec)?;

    let begun = Instant::now();
    let handles: Vec<_> = (0..4).map(|id| submit(&batcher, id)).collect();
    for (id, handle) in (0..).zip(handles) {
        assert_eq!(join(handle).await??, vec![id]);
    }
    let took = begun.elapsed();
    assert!(took < POLL_LIMIT, "{took:?}");
    assert_eq!(spec.batch_items(), vec![4], "{:?}", spec.batches());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn batches_form_at_preferred_sizes() -> TestResult {
    const N: u64 = 16;
    let (spec, gate, _started) = gated_spec();
    let cfg = BatcherConfig { preferred_batch_sizes: vec![8, 4], ..config(8, 64, 1, Duration::from_secs(10)) };
    let batcher = start(cfg, &spec)?;
    let _open = OpenOnDrop(Arc::clone(&gate));

    let handles: Vec<_> = (0..N).map(|id| submit(&batcher, id)).collect();
    wait_until("every request is executing or queued", || {
        spec.batch_items().iter().sum::<usize>() + batcher.stats().queued_now == 16
    })
    .await?;
    gate.open();
    for (id, handle) in (0..).zip(handles) {
        assert_eq!(join(handle).await??, vec![id]);
    }
    let sizes = spec.batch_items();
    assert!(sizes.iter().all(|s| [4, 8].contains(s)), "a batch outside the preferred sizes: {sizes:?}");
    assert_eq!(sizes.iter().sum::<usize>(), 16);
    Ok(())
}

// ---------------------------------------------------------------------------------
// Split and join
// ---------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn oversize_requests_are_split_and_joined_in_order() -> TestResult {
    let spec = Spec { delay: ms(1), ..Spec::default() };
    let batcher = start(config(8, 64, 2, ms(1)), &spec)?;

    let big: Vec<u64> = (100..119).collect();
    let small: Vec<u64> = vec![500, 501, 502];
    let big_handle = submit_with(&batcher, Items(big.clone()), InferOptions::default());
    let small_handle = submit_with(&batcher, Items(small.clone()), InferOptions::default());
    assert_eq!(join(big_handle).await??, big, "the split request's outputs were not joined in order");
    assert_eq!(join(small_handle).await??, small);

    let batches = spec.batches();
    for batch in &batches {
        let items: usize = batch.iter().map(Vec::len).sum();
        assert!(items <= 8, "a batch of {items} items exceeds max_batch_size: {batch:?}");
    }
    let mut parts: Vec<Vec<u64>> = batches.into_iter().flatten().filter(|ids| ids[0] < 500).collect();
    parts.sort();
    assert_eq!(parts, vec![(100..108).collect::<Vec<_>>(), (108..116).collect(), (116..119).collect()]);
    let stats = batcher.stats();
    assert_eq!(stats.items, 22);
    assert_eq!(stats.requests, 4, "one request per part: {stats:?}");
    assert_eq!(stats.queued_now, 0);
    Ok(())
}

// ---------------------------------------------------------------------------------
// Adaptive queue delay
// ---------------------------------------------------------------------------------

/// Outcome of one load run.
#[derive(Debug)]
struct LoadRun {
    p99: Duration,
    requests: usize,
    final_delay: Duration,
    mean_batch_items: f64,
}

fn p99(latencies: &mut [Duration]) -> Duration {
    latencies.sort_unstable();
    let rank = (latencies.len() * 99).div_ceil(100).saturating_sub(1);
    latencies.get(rank).copied().unwrap_or_default()
}

/// Open-loop load: one request every `period` for `length`; p99 over requests sent after `warmup`.
async fn open_loop(
    cfg: BatcherConfig,
    period: Duration,
    length: Duration,
    warmup: Duration,
) -> Result<LoadRun, Box<dyn std::error::Error>> {
    // Cost a + b·items with a = 2 ms, b = 0.2 ms.
    let spec = Spec { delay: ms(2), per_item: Duration::from_micros(200), ..Spec::default() };
    let batcher = start(cfg, &spec)?;
    let begun = Instant::now();
    let mut interval = tokio::time::interval(period);
    let mut handles = Vec::new();
    for id in 0.. {
        interval.tick().await;
        let sent = Instant::now();
        if sent - begun >= length {
            break;
        }
        let b = Arc::clone(&batcher);
        handles.push(tokio::spawn(async move {
            let answer = b.infer(one(id)).await;
            (id, sent, sent.elapsed(), answer)
        }));
    }
    let mut latencies = Vec::new();
    for handle in handles {
        let (id, sent, latency, answer) = tokio::time::timeout(POLL_LIMIT, handle).await??;
        if answer? != vec![id] {
            return Err(format!("request {id} got someone else's answer").into());
        }
        if sent - begun >= warmup {
            latencies.push(latency);
        }
    }
    let stats = batcher.stats();
    Ok(LoadRun {
        requests: latencies.len(),
        p99: p99(&mut latencies),
        final_delay: stats.queue_delay,
        mean_batch_items: stats.mean_batch_items(),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_adaptive_delay_meets_the_p99_target_where_a_fixed_delay_does_not() -> TestResult {
    const TARGET: Duration = Duration::from_millis(20);
    let base = config(64, 4096, 1, ms(50));
    let (period, length, warmup) = (Duration::from_micros(2500), Duration::from_millis(1500), ms(500));

    let adaptive = BatcherConfig { target_p99: Some(TARGET), ..base.clone() };
    let run = open_loop(adaptive, period, length, warmup).await?;
    println!("adaptive (target 20 ms, max 50 ms): {run:?}");
    assert!(run.requests > 300, "{run:?}");
    assert!(run.p99 <= TARGET.mul_f64(1.5), "adaptive p99 {:?} misses the 20 ms target: {run:?}", run.p99);
    assert!(run.final_delay > Duration::ZERO, "the delay never grew from 0: {run:?}");
    assert!(run.final_delay <= ms(50), "the delay exceeded its bound: {run:?}");
    assert!(run.mean_batch_items > 1.0, "no batching happened: {run:?}");

    let fixed = open_loop(base, period, length, warmup).await?;
    println!("fixed 50 ms delay: {fixed:?}");
    assert_eq!(fixed.final_delay, ms(50));
    assert!(fixed.p99 > TARGET, "a fixed 50 ms delay met the 20 ms target: {fixed:?}");
    Ok(())
}

// ---------------------------------------------------------------------------------
// Observer
// ---------------------------------------------------------------------------------

#[derive(Debug, Default)]
struct Recorder {
    /// Per executed batch: (requests, items, queue_times.len()).
    batches: Mutex<Vec<(usize, usize, usize)>>,
    rejected: AtomicU64,
    expired: AtomicU64,
    cancelled: AtomicU64,
}

impl BatchObserver for Recorder {
    fn batch_executed(&self, record: &BatchRecord<'_>) {
        lock(&self.batches).push((record.requests, record.items, record.queue_times.len()));
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

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_observer_sees_batches_rejections_expiries_and_cancellations() -> TestResult {
    let (spec, gate, mut started) = gated_spec();
    let recorder = Arc::new(Recorder::default());
    let observer: Arc<dyn BatchObserver> = Arc::clone(&recorder) as Arc<dyn BatchObserver>;
    let s = spec.clone();
    let batcher = Arc::new(Batcher::spawn_observed(config(4, 2, 1, ms(1)), Some(observer), move |_| {
        Ok(FakeExecutor { spec: s.clone() })
    })?);
    let _open = OpenOnDrop(Arc::clone(&gate));

    let first = submit(&batcher, 0);
    assert_eq!(next_started(&mut started).await?, vec![0]);
    // Fill the queue (2 slots): one that will expire, one that will run.
    let expiring = submit_with(&batcher, one(1), timeout(ms(40)));
    let kept = submit(&batcher, 2);
    wait_until("two requests are queued", || batcher.stats().queued_now == 2).await?;
    assert_eq!(batcher.infer(one(3)).await, Err(BatchError::QueueFull(2)));
    assert_eq!(recorder.rejected.load(Ordering::Relaxed), 1);

    assert_eq!(join(expiring).await?, Err(BatchError::Timeout));
    assert_eq!(recorder.expired.load(Ordering::Relaxed), 1);

    let dropped = tokio::time::timeout(ms(20), batcher.infer(one(4))).await;
    assert!(dropped.is_err(), "request 4 should still have been queued: {dropped:?}");
    assert_eq!(recorder.cancelled.load(Ordering::Relaxed), 1);
    assert_eq!(recorder.rejected.load(Ordering::Relaxed), 1);

    gate.open();
    assert_eq!(join(first).await??, vec![0]);
    assert_eq!(join(kept).await??, vec![2]);
    // One at a time: the queue holds only two.
    for id in 10..16 {
        assert_eq!(tokio::time::timeout(POLL_LIMIT, batcher.infer(one(id))).await??, vec![id]);
    }

    let records = lock(&recorder.batches).clone();
    for &(requests, items, queue_times) in &records {
        assert_eq!(queue_times, requests, "one queue time per request: {records:?}");
        assert_eq!(items, requests, "single-item requests: {records:?}");
    }
    assert_eq!(records.iter().map(|r| r.0).sum::<usize>(), 8, "0, 2 and 10..16 were executed: {records:?}");
    assert_eq!(records.len(), spec.batches().len());
    let stats = batcher.stats();
    assert_eq!(stats.batches, u64::try_from(records.len())?);
    assert_eq!(
        (stats.rejected, stats.expired, stats.cancelled),
        (
            recorder.rejected.load(Ordering::Relaxed),
            recorder.expired.load(Ordering::Relaxed),
            recorder.cancelled.load(Ordering::Relaxed)
        )
    );
    assert!(!spec.executed_ids().iter().any(|id| [1, 3, 4].contains(id)), "{:?}", spec.batches());
    Ok(())
}

// ---------------------------------------------------------------------------------
// Shutdown
// ---------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shutdown_drains_requests_of_every_priority_and_deadline() -> TestResult {
    let (spec, gate, mut started) = gated_spec();
    let cfg = BatcherConfig { priority_levels: 3, priority_aging: ms(20), ..config(2, 64, 1, ms(1)) };
    let batcher = start(cfg, &spec)?;
    let _open = OpenOnDrop(Arc::clone(&gate));

    let first = submit(&batcher, 0);
    assert_eq!(next_started(&mut started).await?, vec![0]);
    let mut kept = Vec::new();
    let mut expiring = Vec::new();
    for id in 1..=12u64 {
        let level = u32::try_from(id % 3)? + 1;
        if id % 4 == 0 {
            let options = InferOptions { priority: Some(level), timeout: Some(ms(30)) };
            expiring.push((id, submit_with(&batcher, one(id), options)));
        } else {
            let t = (id % 2 == 0).then_some(Duration::from_secs(30));
            kept.push((id, submit_with(&batcher, one(id), InferOptions { priority: Some(level), timeout: t })));
        }
    }
    for (id, handle) in expiring {
        assert_eq!(join(handle).await?, Err(BatchError::Timeout), "request {id}");
    }
    wait_until("the rest is queued", || batcher.stats().queued_now == kept.len()).await?;

    let shutting = shutdown_in_background(&batcher);
    wait_until("admission stops", || {
        let mut probe: Pending = Box::pin({
            let b = Arc::clone(&batcher);
            async move { b.infer(one(999)).await }
        });
        matches!(
            probe.as_mut().poll(&mut Context::from_waker(Waker::noop())),
            Poll::Ready(Err(BatchError::ShuttingDown))
        )
    })
    .await?;
    tokio::time::sleep(ms(20)).await;
    assert!(!shutting.is_finished(), "shutdown returned while requests were still blocked");

    gate.open();
    assert_eq!(join(first).await??, vec![0]);
    for (id, handle) in kept {
        assert_eq!(join(handle).await??, vec![id], "admitted request {id} was not answered");
    }
    tokio::time::timeout(POLL_LIMIT, shutting).await??;
    assert_eq!(batcher.infer(one(1000)).await, Err(BatchError::ShuttingDown));
    let executed = spec.executed_ids();
    assert!(executed.iter().all(|id| id % 4 != 0 || *id == 0), "an expired request was executed: {executed:?}");
    assert_eq!(executed.len(), 10, "{executed:?}");
    assert_eq!(batcher.stats().queued_now, 0);
    Ok(())
}

// ---------------------------------------------------------------------------------
// Scheduler CPU use
// ---------------------------------------------------------------------------------

/// CPU ticks (utime + stime) of every thread of this process named `name`, by tid.
fn thread_ticks(name: &str) -> Result<Vec<(u64, u64)>, Box<dyn std::error::Error>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc/self/task")? {
        let entry = entry?;
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else { continue };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else { continue };
        if &stat[open + 1..close] != name {
            continue;
        }
        // After the comm: state is field 3; utime and stime are fields 14 and 15.
        let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
        let (Some(utime), Some(stime)) = (fields.get(11), fields.get(12)) else { continue };
        let tid: u64 = entry.file_name().to_string_lossy().parse()?;
        out.push((tid, utime.parse::<u64>()? + stime.parse::<u64>()?));
    }
    Ok(out)
}

/// Regression: a lone 5-item request (preferred 4, max 8) cannot form the preferred
/// size, so it waits out the 300 ms delay — and the scheduler must sleep meanwhile,
/// not re-evaluate the same decision in a loop.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_scheduler_does_not_spin_while_waiting_out_the_delay() -> TestResult {
    if !std::path::Path::new("/proc/self/task").exists() {
        return Ok(()); // needs Linux procfs
    }
    let before: Vec<u64> = thread_ticks("kiln-scheduler")?.into_iter().map(|(tid, _)| tid).collect();
    let spec = Spec::default();
    let cfg = BatcherConfig { preferred_batch_sizes: vec![4], ..config(8, 64, 1, ms(300)) };
    let batcher = start(cfg, &spec)?;
    let mine = |ticks: Vec<(u64, u64)>| ticks.into_iter().filter(|(tid, _)| !before.contains(tid)).collect::<Vec<_>>();
    let at_start = mine(thread_ticks("kiln-scheduler")?);

    let submitted = Instant::now();
    let answer = tokio::time::timeout(POLL_LIMIT, batcher.infer(Items((0..5).collect()))).await??;
    assert_eq!(answer, (0..5).collect::<Vec<_>>());
    assert!(submitted.elapsed() >= ms(250), "the 5-item request did not wait for the delay");

    let at_end = mine(thread_ticks("kiln-scheduler")?);
    let busiest = at_end
        .iter()
        .map(|&(tid, end)| end - at_start.iter().find(|&&(t, _)| t == tid).map_or(0, |&(_, s)| s))
        .max()
        .ok_or("found no scheduler thread")?;
    // Clock ticks are 10 ms: an idle wait costs ~0, a spinning one ~30.
    assert!(busiest < 10, "the scheduler used {busiest} ticks of CPU during a 300 ms wait");
    Ok(())
}

/// A request that would need more parts than the queue can ever hold is refused before
/// any part is built (a client controls the item count).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_request_too_large_to_ever_queue_is_refused_up_front() -> TestResult {
    let spec = Spec::default();
    let batcher = start(config(2, 4, 1, ms(1)), &spec)?;
    let refused = batcher.infer(Items((0..9).collect())).await;
    assert!(matches!(refused, Err(BatchError::BadItemCount { items: 9, .. })), "{refused:?}");
    assert!(spec.batches().is_empty(), "parts of a refused request ran");
    // Eight items need four parts: exactly the queue's size, so it is admitted.
    let items: Vec<u64> = (0..8).collect();
    assert_eq!(batcher.infer(Items(items.clone())).await?, items);
    Ok(())
}
