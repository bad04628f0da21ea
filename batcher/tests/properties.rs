//! Randomised scenarios against the batcher's invariants: random configurations,
//! request sizes (some above `max_batch_size`, so split and joined), priorities,
//! deadlines and cancellations, with a fake executor that logs every batch.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use kiln_batcher::{BatchError, Batcher, BatcherConfig, Executor, ExecutorError, InferOptions, Payload};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

/// Allowance between our clock readings and the batcher's: we compute a request's
/// deadline just before the batcher takes its admission time, and the executor reads
/// the clock just after the batcher's execution start. Both gaps are microseconds
/// unless a thread is preempted; this covers a preemption or two on a loaded machine.
const CLOCK_SLACK: Duration = Duration::from_millis(5);
/// Bound on waiting for one scenario's requests, or for shutdown.
const CASE_LIMIT: Duration = Duration::from_secs(10);
/// Item ids are `request * ID_STRIDE + k`.
const ID_STRIDE: u64 = 100;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A request's items (ids) and the deadline the test set for it, carried along so that
/// the executor can check it.
#[derive(Debug, Clone)]
struct Part {
    ids: Vec<u64>,
    deadline: Option<Instant>,
}

impl Payload for Part {
    fn items(&self) -> usize {
        self.ids.len()
    }

    fn split(self, sizes: &[usize]) -> Result<Vec<Self>, ExecutorError> {
        if sizes.iter().sum::<usize>() != self.ids.len() {
            return Err(ExecutorError(format!("sizes {sizes:?} do not cover {} items", self.ids.len())));
        }
        let mut rest = self.ids.as_slice();
        let mut parts = Vec::with_capacity(sizes.len());
        for &n in sizes {
            let (part, tail) = rest.split_at(n);
            parts.push(Part { ids: part.to_vec(), deadline: self.deadline });
            rest = tail;
        }
        Ok(parts)
    }
}

#[derive(Debug)]
struct Executed {
    inputs: Vec<Part>,
    start: Instant,
}

#[derive(Debug)]
struct Exec {
    log: Arc<Mutex<Vec<Executed>>>,
    cost: Duration,
}

impl Executor for Exec {
    type Input = Part;
    type Output = Vec<u64>;

    fn execute(&mut self, inputs: &[&Part]) -> Result<Vec<Vec<u64>>, ExecutorError> {
        let start = Instant::now();
        lock(&self.log).push(Executed { inputs: inputs.iter().map(|&p| p.clone()).collect(), start });
        if !self.cost.is_zero() {
            std::thread::sleep(self.cost);
        }
        Ok(inputs.iter().map(|p| p.ids.clone()).collect())
    }

    fn join(parts: Vec<Vec<u64>>) -> Result<Vec<u64>, ExecutorError> {
        Ok(parts.concat())
    }
}

#[derive(Debug, Clone)]
struct RequestSpec {
    items: usize,
    /// 1..=3, folded into the configured levels.
    priority: u32,
    timeout_ms: Option<u64>,
    /// Drop the request's future after this long.
    cancel_ms: Option<u64>,
    /// Submit after this long.
    start_us: u64,
}

#[derive(Debug, Clone)]
struct Scenario {
    max_batch_size: usize,
    instance_count: usize,
    preferred: [bool; 8],
    priority_levels: u32,
    delay_us: u64,
    max_queue_size: usize,
    cost_us: u64,
    requests: Vec<RequestSpec>,
}

fn request() -> impl Strategy<Value = RequestSpec> {
    (1..=12usize, 1..=3u32, prop::option::weighted(0.4, 1..=30u64), prop::option::weighted(0.25, 0..=5u64), 0..=3000u64)
        .prop_map(|(items, priority, timeout_ms, cancel_ms, start_us)| RequestSpec {
            items,
            priority,
            timeout_ms,
            cancel_ms,
            start_us,
        })
}

fn scenario() -> impl Strategy<Value = Scenario> {
    (
        1..=8usize,
        1..=3usize,
        prop::array::uniform8(any::<bool>()),
        1..=3u32,
        0..=3000u64,
        4..=64usize,
        0..=2000u64,
        prop::collection::vec(request(), 1..=60),
    )
        .prop_map(
            |(
                max_batch_size,
                instance_count,
                preferred,
                priority_levels,
                delay_us,
                max_queue_size,
                cost_us,
                requests,
            )| {
                Scenario {
                    max_batch_size,
                    instance_count,
                    preferred,
                    priority_levels,
                    delay_us,
                    max_queue_size,
                    cost_us,
                    requests,
                }
            },
        )
}

#[derive(Debug)]
enum Outcome {
    Answered(Result<Vec<u64>, BatchError>),
    /// The client dropped the future before it finished.
    Dropped,
}

fn ids_of(request: u64, items: usize) -> Vec<u64> {
    (0..items as u64).map(|k| request * ID_STRIDE + k).collect()
}

fn run(s: &Scenario) -> Result<(), TestCaseError> {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(4).enable_all().build()?;
    runtime.block_on(check(s))
}

async fn check(s: &Scenario) -> Result<(), TestCaseError> {
    let max = s.max_batch_size;
    let preferred: Vec<usize> = (1..=8).zip(s.preferred).filter(|&(p, on)| on && p <= max).map(|(p, _)| p).collect();
    let config = BatcherConfig {
        max_batch_size: max,
        max_queue_delay: Duration::from_micros(s.delay_us),
        preferred_batch_sizes: preferred,
        max_queue_size: s.max_queue_size,
        instance_count: s.instance_count,
        priority_levels: s.priority_levels,
        default_priority: 1,
        priority_aging: Duration::from_millis(5),
        ..BatcherConfig::default()
    };
    let log = Arc::new(Mutex::new(Vec::new()));
    let cost = Duration::from_micros(s.cost_us);
    let exec_log = Arc::clone(&log);
    let batcher = Arc::new(
        Batcher::spawn(config, move |_| Ok(Exec { log: Arc::clone(&exec_log), cost }))
            .map_err(|e| TestCaseError::fail(format!("spawn failed: {e}")))?,
    );

    // Parts of requests whose futures are alive; its peak bounds what could be queued.
    let in_flight = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let mut handles = Vec::with_capacity(s.requests.len());
    for (index, r) in (0u64..).zip(&s.requests) {
        let (batcher, in_flight, peak, r) =
            (Arc::clone(&batcher), Arc::clone(&in_flight), Arc::clone(&peak), r.clone());
        let level = (r.priority - 1) % s.priority_levels + 1;
        let parts = r.items.div_ceil(max);
        handles.push(tokio::spawn(async move {
            tokio::time::sleep(Duration::from_micros(r.start_us)).await;
            let now = in_flight.fetch_add(parts, Ordering::SeqCst) + parts;
            peak.fetch_max(now, Ordering::SeqCst);
            let timeout = r.timeout_ms.map(Duration::from_millis);
            let deadline = timeout.map(|t| Instant::now() + t);
            let input = Part { ids: ids_of(index, r.items), deadline };
            let answer = batcher.infer_with(input, InferOptions { priority: Some(level), timeout });
            let outcome = match r.cancel_ms {
                Some(after) => match tokio::time::timeout(Duration::from_millis(after), answer).await {
                    Ok(result) => Outcome::Answered(result),
                    Err(_) => Outcome::Dropped,
                },
                None => Outcome::Answered(answer.await),
            };
            in_flight.fetch_sub(parts, Ordering::SeqCst);
            outcome
        }));
    }
    let mut outcomes = Vec::with_capacity(handles.len());
    let limit = Instant::now() + CASE_LIMIT;
    for handle in handles {
        outcomes.push(tokio::time::timeout_at(limit.into(), handle).await??);
    }

    // Every request has finished: nothing may still hold a queue slot.
    prop_assert_eq!(batcher.stats().queued_now, 0, "queue slots leaked: {:?}", batcher.stats());

    // Still serving, then shut down.
    let last = (s.requests.len() as u64) + 1;
    let answer = tokio::time::timeout(CASE_LIMIT, batcher.infer(Part { ids: ids_of(last, 1), deadline: None })).await?;
    prop_assert_eq!(answer?, ids_of(last, 1));
    let b = Arc::clone(&batcher);
    tokio::time::timeout(CASE_LIMIT, tokio::task::spawn_blocking(move || b.shutdown())).await??;
    let refused = batcher.infer(Part { ids: ids_of(last + 1, 1), deadline: None }).await;
    prop_assert_eq!(refused, Err(BatchError::ShuttingDown));

    // After shutdown every executor thread has exited, so the log and the stats are complete.
    let batches: Vec<Executed> = std::mem::take(&mut *lock(&log));
    // No batch exceeds the limit, and nothing executed after its deadline.
    let mut executed_ids: Vec<u64> = Vec::new();
    for batch in &batches {
        let items: usize = batch.inputs.iter().map(|p| p.ids.len()).sum();
        prop_assert!(items >= 1 && items <= max, "a batch of {} items (max {})", items, max);
        for part in &batch.inputs {
            if let Some(deadline) = part.deadline {
                prop_assert!(
                    batch.start <= deadline + CLOCK_SLACK,
                    "part {:?} started {:?} after its deadline",
                    part.ids,
                    batch.start.saturating_duration_since(deadline)
                );
            }
            executed_ids.extend(&part.ids);
        }
    }
    // Every part executed at most once (cancelled ones included).
    let total = executed_ids.len();
    executed_ids.sort_unstable();
    executed_ids.dedup();
    prop_assert_eq!(total, executed_ids.len(), "some part was executed twice");
    let executed = |id: u64| executed_ids.binary_search(&id).is_ok();

    let queue_full_seen = outcomes.iter().any(|o| matches!(o, Outcome::Answered(Err(BatchError::QueueFull(_)))));
    if queue_full_seen {
        let peak = peak.load(Ordering::SeqCst);
        prop_assert!(peak > s.max_queue_size, "QueueFull although at most {} parts were ever in flight", peak);
    }
    for ((index, r), outcome) in (0u64..).zip(&s.requests).zip(&outcomes) {
        let ids = ids_of(index, r.items);
        let unsplit = r.items <= max;
        let never_executed = !ids.iter().any(|&id| executed(id));
        match outcome {
            Outcome::Answered(Ok(output)) => {
                prop_assert_eq!(output, &ids, "request {} got a wrong answer", index);
                prop_assert!(ids.iter().all(|&id| executed(id)), "request {} answered but not executed", index);
            }
            Outcome::Answered(Err(BatchError::QueueFull(n))) => {
                prop_assert_eq!(*n, s.max_queue_size);
                if unsplit {
                    prop_assert!(never_executed, "refused request {} was executed", index);
                }
            }
            Outcome::Answered(Err(BatchError::Timeout)) => {
                prop_assert!(r.timeout_ms.is_some(), "request {} without a deadline timed out", index);
                if unsplit {
                    prop_assert!(never_executed, "request {} answered Timeout was executed", index);
                }
            }
            Outcome::Answered(Err(BatchError::BadItemCount { items, .. })) => {
                // Refused up front only when its parts could never all fit the queue.
                prop_assert!(items.div_ceil(max) > s.max_queue_size, "request {} refused needlessly", index);
                prop_assert!(never_executed, "refused request {} was executed", index);
            }
            Outcome::Answered(Err(other)) => {
                prop_assert!(false, "request {} ({:?}) got an unexpected error {:?}", index, r, other);
            }
            Outcome::Dropped => prop_assert!(r.cancel_ms.is_some(), "request {} dropped without cancel", index),
        }
    }

    let stats = batcher.stats();
    prop_assert_eq!(stats.queued_now, 0, "queue slots leaked: {:?}", stats);
    prop_assert_eq!(stats.batches, batches.len() as u64);
    prop_assert_eq!(stats.requests, batches.iter().map(|b| b.inputs.len() as u64).sum::<u64>());
    prop_assert_eq!(stats.items, total as u64);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 24,
        failure_persistence: None,
        max_shrink_iters: 64,
        ..ProptestConfig::default()
    })]

    #[test]
    fn random_scenarios_keep_the_batcher_invariants(s in scenario()) {
        run(&s)?;
    }
}
