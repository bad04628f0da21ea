//! The workers: OS threads each running a single-threaded tokio runtime that owns a share
//! of the connections (wrk's model: no work stealing, no cross-thread wake-ups on the
//! request path). Closed loop keeps a fixed number of requests in flight; open loop sends
//! on a schedule and measures each request from the time it was due (coordinated-omission
//! correction).

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::{Semaphore, watch};

use super::LoadError;
use super::client::{Connector, Sender, exchange};
use super::payload::Workload;
use super::stats::{Failure, Shard};
use super::ticker::Ticker;

/// How a refused or broken connection is retried: often enough to notice a server that
/// comes back, rarely enough not to spin.
const RECONNECT_BACKOFF: Duration = Duration::from_millis(50);

/// How requests arrive in open loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Arrival {
    /// Evenly spaced sends.
    Constant,
    /// Exponential gaps (a Poisson process), as independent users produce.
    Poisson,
}

/// What the workers share for one level.
#[derive(Debug)]
pub(crate) struct Context {
    pub connector: Connector,
    pub workload: Arc<Workload>,
    pub timeout: Duration,
    pub check_body: bool,
    pub arrival: Arrival,
    /// Open-loop schedules start here.
    pub start: Instant,
    /// Open-loop send times (precise, unlike tokio's timer).
    pub ticker: Ticker,
}

/// One connection's job.
#[derive(Debug, Clone, Copy)]
pub(crate) enum ConnPlan {
    /// Keep `lanes` requests in flight (1 for HTTP/1.1; HTTP/2 streams otherwise).
    Closed { lanes: usize },
    /// Send `rate` requests per second, the first at `start + offset`, at most
    /// `max_streams` in flight (HTTP/2).
    Open { rate: f64, offset: Duration, max_streams: usize },
}

/// A running worker thread; `stop` ends it, abandoning requests still in flight (they
/// finish after the measurement and would not be counted anyway).
#[derive(Debug)]
pub(crate) struct Worker {
    stop: watch::Sender<bool>,
    handle: JoinHandle<()>,
}

impl Worker {
    pub(crate) fn spawn(
        index: usize,
        ctx: Arc<Context>,
        shard: Arc<Shard>,
        conns: Vec<(usize, ConnPlan)>,
    ) -> Result<Self, LoadError> {
        let (stop, mut stopped) = watch::channel(false);
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(LoadError::Runtime)?;
        let handle = std::thread::Builder::new()
            .name(format!("kiln-bench-{index}"))
            .spawn(move || {
                runtime.block_on(async move {
                    for (seed, plan) in conns {
                        let (ctx, shard) = (ctx.clone(), shard.clone());
                        match plan {
                            ConnPlan::Closed { lanes } => tokio::spawn(closed_connection(ctx, shard, lanes, seed)),
                            ConnPlan::Open { rate, offset, max_streams } => {
                                let pacer = Pacer::new(ctx.start + offset, rate, ctx.arrival, seed as u64);
                                tokio::spawn(open_connection(ctx, shard, pacer, max_streams, seed))
                            }
                        };
                    }
                    let _ = stopped.wait_for(|s| *s).await;
                });
                // Dropping the runtime cancels every connection task.
                drop(runtime);
            })
            .map_err(LoadError::Runtime)?;
        Ok(Self { stop, handle })
    }

    pub(crate) fn signal_stop(&self) {
        let _ = self.stop.send(true);
    }

    pub(crate) fn join(self) {
        self.signal_stop();
        let _ = self.handle.join();
    }
}

async fn connect(ctx: &Context, shard: &Shard) -> Sender {
    loop {
        match ctx.connector.connect().await {
            Ok(sender) => return sender,
            Err(f) => {
                shard.failure(f, 1);
                tokio::time::sleep(RECONNECT_BACKOFF).await;
            }
        }
    }
}

async fn closed_connection(ctx: Arc<Context>, shard: Arc<Shard>, lanes: usize, seed: usize) {
    loop {
        let sender = connect(&ctx, &shard).await;
        let answered = if lanes <= 1 {
            closed_lane(ctx.clone(), shard.clone(), sender, seed).await
        } else {
            let mut tasks = Vec::with_capacity(lanes);
            for lane in 0..lanes {
                if let Some(stream) = sender.stream() {
                    tasks.push(tokio::spawn(closed_lane(ctx.clone(), shard.clone(), stream, seed * lanes + lane)));
                }
            }
            drop(sender);
            let mut answered = 0;
            for t in tasks {
                answered += t.await.unwrap_or(0);
            }
            answered
        };
        // A server that takes connections and drops them must not make the client spin.
        if answered == 0 {
            tokio::time::sleep(RECONNECT_BACKOFF).await;
        }
    }
}

/// Sends back to back until the connection breaks; returns how many answers came back.
async fn closed_lane(ctx: Arc<Context>, shard: Arc<Shard>, mut sender: Sender, seed: usize) -> u64 {
    let http2 = ctx.connector.http2;
    let mut answered = 0;
    for i in seed.. {
        let template = ctx.workload.get(i);
        let sent = Instant::now();
        match exchange(&mut sender, template, ctx.timeout, ctx.check_body).await {
            Ok(answer) => {
                answered += 1;
                shard.success(sent.elapsed(), answer.items, None);
            }
            // Closed after the last answer: reconnect and carry on. Closed before any
            // answer: the server refuses to serve on this connection, a failure.
            Err(Failure::Closed) if answered > 0 => return answered,
            Err(f) => {
                // Error statuses and wrong bodies are answers too.
                answered += u64::from(matches!(f, Failure::Status(_) | Failure::BadBody | Failure::WrongAnswer));
                shard.failure(if f == Failure::Closed { Failure::Io } else { f }, 1);
                if f.breaks(http2) {
                    return answered;
                }
            }
        }
    }
    answered
}

async fn open_connection(ctx: Arc<Context>, shard: Arc<Shard>, mut pacer: Pacer, max_streams: usize, seed: usize) {
    let http2 = ctx.connector.http2;
    let mut index = seed;
    loop {
        let sender = match ctx.connector.connect().await {
            Ok(sender) => sender,
            Err(_) => {
                tokio::time::sleep(RECONNECT_BACKOFF).await;
                // Requests due while there was no connection were never sent: each is an
                // error (attempts are not counted; the schedule says what was lost).
                shard.failure(Failure::Connect, pacer.skip_until(Instant::now()));
                continue;
            }
        };
        if http2 {
            open_streams(&ctx, &shard, &mut pacer, sender, max_streams, &mut index).await;
        } else {
            open_sequential(&ctx, &shard, &mut pacer, sender, &mut index).await;
        }
    }
}

/// HTTP/1.1: one request at a time; a request due while the previous one is still out is
/// sent late, and its latency still counts from when it was due.
async fn open_sequential(ctx: &Context, shard: &Shard, pacer: &mut Pacer, mut sender: Sender, index: &mut usize) {
    let mut sent = 0u64;
    loop {
        let due = pacer.peek();
        ctx.ticker.sleep_until(due).await;
        let template = ctx.workload.get(*index);
        let lag = due.elapsed();
        let result = exchange(&mut sender, template, ctx.timeout, ctx.check_body).await;
        if sent > 0 && result.as_ref().is_err_and(|f| *f == Failure::Closed) {
            // Not sent: the same request goes out on the next connection, still due when it was.
            return;
        }
        pacer.advance();
        *index += 1;
        sent += 1;
        match result {
            Ok(answer) => shard.success(due.elapsed(), answer.items, Some(lag)),
            Err(f) => {
                shard.failure(if f == Failure::Closed { Failure::Io } else { f }, 1);
                if f.breaks(false) {
                    return;
                }
            }
        }
    }
}

/// HTTP/2: every due request goes out on its own stream, up to `max_streams` at once;
/// beyond that requests wait for a stream, and the wait counts in their latency.
async fn open_streams(
    ctx: &Arc<Context>,
    shard: &Arc<Shard>,
    pacer: &mut Pacer,
    sender: Sender,
    max_streams: usize,
    index: &mut usize,
) {
    let streams = Arc::new(Semaphore::new(max_streams.max(1)));
    let (broken_tx, broken) = watch::channel(false);
    let broken_tx = Arc::new(broken_tx);
    loop {
        let due = pacer.peek();
        ctx.ticker.sleep_until(due).await;
        if *broken.borrow() {
            return;
        }
        pacer.advance();
        let Some(mut stream) = sender.stream() else { return };
        let (ctx, shard, streams, broken_tx) = (ctx.clone(), shard.clone(), streams.clone(), broken_tx.clone());
        let i = *index;
        *index += 1;
        tokio::spawn(async move {
            let Ok(_permit) = streams.acquire_owned().await else { return };
            let lag = due.elapsed();
            match exchange(&mut stream, ctx.workload.get(i), ctx.timeout, ctx.check_body).await {
                Ok(answer) => shard.success(due.elapsed(), answer.items, Some(lag)),
                Err(f) => {
                    // A stream cannot be re-sent once handed over: a closed connection fails it.
                    shard.failure(if f == Failure::Closed { Failure::Io } else { f }, 1);
                    if f.breaks(true) {
                        let _ = broken_tx.send(true);
                    }
                }
            }
        });
    }
}

/// An open-loop send schedule.
#[derive(Debug)]
pub(crate) struct Pacer {
    next: Instant,
    mean_gap: f64,
    poisson: bool,
    rng: fastrand::Rng,
}

impl Pacer {
    pub(crate) fn new(first: Instant, rate: f64, arrival: Arrival, seed: u64) -> Self {
        let mean_gap = if rate > 0.0 { 1.0 / rate } else { f64::INFINITY };
        let mut pacer =
            Self { next: first, mean_gap, poisson: arrival == Arrival::Poisson, rng: fastrand::Rng::with_seed(seed) };
        if pacer.poisson {
            pacer.next = first + pacer.gap();
        }
        pacer
    }

    fn gap(&mut self) -> Duration {
        let secs = if self.poisson { -(1.0 - self.rng.f64()).ln() * self.mean_gap } else { self.mean_gap };
        Duration::try_from_secs_f64(secs).unwrap_or(Duration::from_secs(3600))
    }

    pub(crate) fn peek(&self) -> Instant {
        self.next
    }

    pub(crate) fn advance(&mut self) {
        let gap = self.gap();
        self.next += gap;
    }

    /// Drops every send due by `now`; returns how many.
    pub(crate) fn skip_until(&mut self, now: Instant) -> u64 {
        let mut n = 0;
        while self.next <= now {
            self.advance();
            n += 1;
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_schedule_is_evenly_spaced() {
        let t0 = Instant::now();
        let mut p = Pacer::new(t0, 1000.0, Arrival::Constant, 1);
        assert_eq!(p.peek(), t0);
        p.advance();
        assert_eq!(p.peek() - t0, Duration::from_millis(1));
        assert_eq!(p.skip_until(t0 + Duration::from_micros(10_500)), 10);
        assert_eq!(p.peek() - t0, Duration::from_millis(11));
    }

    #[test]
    fn poisson_schedule_has_the_requested_mean_rate() {
        let t0 = Instant::now();
        let mut p = Pacer::new(t0, 2000.0, Arrival::Poisson, 7);
        let n = p.skip_until(t0 + Duration::from_secs(20));
        // 40,000 expected; the standard deviation of a Poisson count is 200.
        assert!((39_000..=41_000).contains(&n), "{n}");
    }
}
