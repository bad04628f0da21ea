//! Benchmark of the dynamic batcher alone, in process (no network, no model):
//!
//! 1. Overhead, with an executor that costs nothing (it echoes its inputs' ids): the
//!    `infer` round trip one request at a time, next to reference round trips through
//!    bare thread hops; then the sustained request rate of many concurrent tasks.
//! 2. Batching policy, with a simulated executor that sleeps `a + b·batch`: open-loop
//!    load (Poisson or constant-rate arrivals) at several offered rates, for no
//!    batching, a fixed queue delay and the adaptive delay under a p99 target. Latency
//!    runs from each request's intended send time to its answer, so a stalled system
//!    cannot hide its queueing (no coordinated omission).
//!
//! Prints markdown tables and writes JSON. Every phase is bounded in time.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, ensure};
use clap::{Parser, ValueEnum};
use hdrhistogram::Histogram;
use kiln_batcher::{BatchError, Batcher, BatcherConfig, Executor, ExecutorError, Payload, StatsSnapshot};
use serde::Serialize;
use tokio::runtime::Runtime;

#[derive(Parser, Debug)]
#[command(about = "In-process benchmark of kiln's dynamic batcher: overhead and batching policy")]
struct Args {
    /// Shorter phases and fewer offered loads (about 15 s in all).
    #[arg(long)]
    quick: bool,
    /// Run only some phases (the others' tables stay empty).
    #[arg(long, value_enum, default_value_t = Phase::All)]
    phase: Phase,
    /// Requests timed one at a time for the latency overhead [default: 20000, quick 5000].
    #[arg(long)]
    latency_requests: Option<u64>,
    /// Concurrent tasks for the maximum request rate.
    #[arg(long, default_value_t = 256)]
    tasks: usize,
    /// Seconds measured per maximum-rate run [default: 3, quick 1].
    #[arg(long)]
    rate_seconds: Option<f64>,
    /// Offered loads in requests/s for the simulated executor
    /// [default: 100,200,400,800,1600,3200; quick: 200,800,3200].
    #[arg(long, value_delimiter = ',')]
    loads: Option<Vec<f64>>,
    /// Seconds measured per offered load, after a warm-up [default: 3, quick 1].
    #[arg(long)]
    load_seconds: Option<f64>,
    /// Warm-up seconds per offered load, not measured [default: 0.5, quick 0.25].
    #[arg(long)]
    warmup_seconds: Option<f64>,
    /// Arrival process of the open-loop load.
    #[arg(long, value_enum, default_value_t = Arrivals::Poisson)]
    arrivals: Arrivals,
    /// Simulated executor: fixed cost per batch `a`, in ms.
    #[arg(long, default_value_t = 2.0)]
    cost_fixed_ms: f64,
    /// Simulated executor: cost per batch item `b`, in ms.
    #[arg(long, default_value_t = 0.1)]
    cost_item_ms: f64,
    /// Largest batch of the simulated executor (batching modes).
    #[arg(long, default_value_t = 32)]
    max_batch: usize,
    /// Queue delay of the fixed-delay mode, in ms.
    #[arg(long, default_value_t = 20.0)]
    fixed_delay_ms: f64,
    /// p99 target of the adaptive mode, in ms.
    #[arg(long, default_value_t = 15.0)]
    target_p99_ms: f64,
    /// Upper bound of the adaptive delay, in ms.
    #[arg(long, default_value_t = 50.0)]
    adaptive_max_delay_ms: f64,
    /// Where to write the JSON report.
    #[arg(long, default_value = "out/bench-batcher.json")]
    out: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
enum Phase {
    All,
    /// 1a: round trip one request at a time.
    Latency,
    /// 1b: maximum sustained request rate.
    Rate,
    /// 2: simulated executor under open-loop load.
    Simulated,
}

impl Phase {
    fn runs(self, phase: Self) -> bool {
        self == Self::All || self == phase
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
enum Arrivals {
    Poisson,
    Constant,
}

/// A request carrying one item: its id.
#[derive(Debug)]
struct Req(u64);

impl Payload for Req {
    fn items(&self) -> usize {
        1
    }
}

/// Costs nothing: answers each request with its id.
#[derive(Debug)]
struct Echo;

impl Executor for Echo {
    type Input = Req;
    type Output = u64;

    fn execute(&mut self, inputs: &[&Req]) -> Result<Vec<u64>, ExecutorError> {
        Ok(inputs.iter().map(|r| r.0).collect())
    }
}

/// Sleeps `fixed + per_item · batch` per batch.
#[derive(Debug, Clone, Copy)]
struct Simulated {
    fixed: Duration,
    per_item: Duration,
}

impl Simulated {
    fn cost(&self, items: usize) -> Duration {
        self.fixed + self.per_item * u32::try_from(items).unwrap_or(u32::MAX)
    }
}

impl Executor for Simulated {
    type Input = Req;
    type Output = u64;

    fn execute(&mut self, inputs: &[&Req]) -> Result<Vec<u64>, ExecutorError> {
        std::thread::sleep(self.cost(inputs.len()));
        Ok(inputs.iter().map(|r| r.0).collect())
    }
}

#[derive(Debug, Serialize)]
struct LatencyRow {
    what: String,
    requests: u64,
    p50_us: f64,
    p90_us: f64,
    p99_us: f64,
    max_us: f64,
    /// Batcher only: mean time from admission to execution start (scheduler hop and
    /// executor hop); the rest of the round trip is the answer's way back to the task.
    queue_mean_us: Option<f64>,
}

#[derive(Debug, Serialize)]
struct RateRow {
    tasks: usize,
    max_batch_size: usize,
    queue_delay_us: f64,
    seconds: f64,
    requests: u64,
    errors: u64,
    requests_per_s: f64,
    mean_batch: f64,
}

#[derive(Debug, Serialize)]
struct SleepRow {
    requested_ms: f64,
    samples: usize,
    mean_ms: f64,
    max_ms: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
enum Mode {
    NoBatching,
    FixedDelay,
    Adaptive,
}

impl Mode {
    fn label(self) -> &'static str {
        match self {
            Self::NoBatching => "no batching",
            Self::FixedDelay => "fixed delay",
            Self::Adaptive => "adaptive",
        }
    }
}

#[derive(Debug, Serialize)]
struct LoadRow {
    mode: Mode,
    max_batch_size: usize,
    offered_per_s: f64,
    /// Requests whose intended send time fell in the measured window.
    sent: u64,
    completed: u64,
    rejected: u64,
    errors: u64,
    /// Answers that arrived within the measured window, per second of it.
    achieved_per_s: f64,
    p50_ms: f64,
    p90_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    mean_batch: f64,
    /// Measured executor time per batch, and what `a + b·mean_batch` predicts.
    compute_ms_per_batch: f64,
    model_ms_per_batch: f64,
    /// Mean of the queue delay in force, sampled through the window, and its last value.
    mean_delay_ms: f64,
    final_delay_ms: f64,
}

#[derive(Debug, Serialize)]
struct Settings {
    quick: bool,
    phase: Phase,
    latency_requests: u64,
    tasks: usize,
    rate_seconds: f64,
    loads: Vec<f64>,
    load_seconds: f64,
    warmup_seconds: f64,
    arrivals: Arrivals,
    cost_fixed_ms: f64,
    cost_item_ms: f64,
    max_batch: usize,
    fixed_delay_ms: f64,
    target_p99_ms: f64,
    adaptive_max_delay_ms: f64,
    max_queue_size: usize,
}

#[derive(Debug, Serialize)]
struct Report {
    started_utc: String,
    unix_time: u64,
    machine: String,
    settings: Settings,
    overhead_latency: Vec<LatencyRow>,
    overhead_rate: Vec<RateRow>,
    sleep_calibration: Vec<SleepRow>,
    simulated: Vec<LoadRow>,
    total_seconds: f64,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let began = Instant::now();
    let unix_time = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let quick = args.quick;
    let settings = Settings {
        quick,
        phase: args.phase,
        latency_requests: args.latency_requests.unwrap_or(if quick { 5_000 } else { 20_000 }),
        tasks: args.tasks.max(1),
        rate_seconds: args.rate_seconds.unwrap_or(if quick { 1.0 } else { 3.0 }),
        loads: args.loads.clone().unwrap_or_else(|| {
            if quick { vec![200.0, 800.0, 3200.0] } else { vec![100.0, 200.0, 400.0, 800.0, 1600.0, 3200.0] }
        }),
        load_seconds: args.load_seconds.unwrap_or(if quick { 1.0 } else { 3.0 }),
        warmup_seconds: args.warmup_seconds.unwrap_or(if quick { 0.25 } else { 0.5 }),
        arrivals: args.arrivals,
        cost_fixed_ms: args.cost_fixed_ms,
        cost_item_ms: args.cost_item_ms,
        max_batch: args.max_batch.max(1),
        fixed_delay_ms: args.fixed_delay_ms,
        target_p99_ms: args.target_p99_ms,
        adaptive_max_delay_ms: args.adaptive_max_delay_ms,
        max_queue_size: BatcherConfig::default().max_queue_size,
    };
    ensure!(settings.loads.iter().all(|&l| l > 0.0 && l.is_finite()), "offered loads must be positive");
    ensure!(settings.target_p99_ms > 0.0, "the p99 target must be positive");

    let multi = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let current = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let workers = multi.metrics().num_workers();

    // 1a. Round trip one request at a time, and bare thread hops for reference.
    let n = settings.latency_requests;
    let mut overhead_latency = Vec::new();
    let runs: [(&str, &Runtime, RoundTrip); 4] = [
        ("batcher infer(), tokio multi-thread", &multi, RoundTrip::Batcher),
        ("batcher infer(), tokio current-thread", &current, RoundTrip::Batcher),
        ("reference: task → thread → oneshot", &multi, RoundTrip::OneHop),
        ("reference: task → thread → thread → oneshot", &multi, RoundTrip::TwoHops),
    ];
    for (label, rt, kind) in runs.into_iter().filter(|_| args.phase.runs(Phase::Latency)) {
        let what = if label.contains("multi-thread") || label.starts_with("reference") {
            format!("{label} ({workers} workers)")
        } else {
            label.to_string()
        };
        eprint!("overhead: {what}, {n} requests at concurrency 1 …");
        let row = round_trips(rt, kind, &what, n)?;
        eprintln!(" p50 {:.1} µs, p99 {:.1} µs", row.p50_us, row.p99_us);
        overhead_latency.push(row);
    }

    // 1b. Maximum sustained request rate.
    let mut overhead_rate = Vec::new();
    for delay_us in [0.0, 100.0].into_iter().filter(|_| args.phase.runs(Phase::Rate)) {
        eprint!(
            "overhead: {} tasks looping infer(), max batch 64, delay {delay_us} µs, {} s …",
            settings.tasks, settings.rate_seconds
        );
        let row = max_rate(&multi, settings.tasks, delay_us, settings.rate_seconds)?;
        eprintln!(" {:.0} req/s, mean batch {:.1}", row.requests_per_s, row.mean_batch);
        overhead_rate.push(row);
    }

    // 2. Simulated executor under open-loop load.
    let sim = Simulated {
        fixed: Duration::from_secs_f64(settings.cost_fixed_ms / 1e3),
        per_item: Duration::from_secs_f64(settings.cost_item_ms / 1e3),
    };
    let (mut sleep_calibration, mut simulated) = (Vec::new(), Vec::new());
    if args.phase.runs(Phase::Simulated) {
        eprint!("calibrating std::thread::sleep …");
        sleep_calibration = calibrate_sleep(sim, settings.max_batch, if quick { 20 } else { 50 });
        eprintln!(
            " overshoot {}",
            sleep_calibration
                .iter()
                .map(|r| format!("{:.0} µs", (r.mean_ms - r.requested_ms) * 1e3))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    for mode in
        [Mode::NoBatching, Mode::FixedDelay, Mode::Adaptive].into_iter().filter(|_| args.phase.runs(Phase::Simulated))
    {
        for (i, &rate) in settings.loads.iter().enumerate() {
            eprint!("simulated: {}, offered {rate} req/s, {} s …", mode.label(), settings.load_seconds);
            let row = open_loop(&multi, &settings, sim, mode, rate, 0x5eed_0000 + i as u64)?;
            eprintln!(
                " {:.0} req/s, p50 {:.2} ms, p99 {:.2} ms, batch {:.1}, rejected {}",
                row.achieved_per_s, row.p50_ms, row.p99_ms, row.mean_batch, row.rejected
            );
            simulated.push(row);
        }
    }

    let report = Report {
        started_utc: utc(unix_time),
        unix_time,
        machine: kiln_bench::machine(),
        settings,
        overhead_latency,
        overhead_rate,
        sleep_calibration,
        simulated,
        total_seconds: began.elapsed().as_secs_f64(),
    };
    print_tables(&report);
    if let Some(dir) = args.out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&args.out, serde_json::to_vec_pretty(&report)?)
        .with_context(|| format!("writing {}", args.out.display()))?;
    println!("\nwrote {} ({:.0} s)", args.out.display(), report.total_seconds);
    Ok(())
}

/// `YYYY-MM-DD HH:MM:SS UTC` from Unix seconds (days-to-civil, proleptic Gregorian).
fn utc(secs: u64) -> String {
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC", rem / 3600, rem % 3600 / 60, rem % 60)
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

fn histogram() -> anyhow::Result<Histogram<u64>> {
    // Nanoseconds or microseconds; up to an hour either way is more than enough.
    Ok(Histogram::<u64>::new_with_bounds(1, 3_600_000_000_000, 3)?)
}

fn zero_cost_config(max_batch_size: usize, delay: Duration) -> BatcherConfig {
    BatcherConfig { max_batch_size, max_queue_delay: delay, ..BatcherConfig::default() }
}

#[derive(Debug, Clone, Copy)]
enum RoundTrip {
    Batcher,
    /// Task → crossbeam channel → OS thread → tokio oneshot → task: the least a design
    /// with one executor thread could cost.
    OneHop,
    /// Task → thread → thread → oneshot: the batcher's path (scheduler, then executor)
    /// without its bookkeeping.
    TwoHops,
}

type Reply = tokio::sync::oneshot::Sender<u64>;

/// Times `n` round trips one at a time from a spawned task (after `n / 10` unmeasured).
fn round_trips(rt: &Runtime, kind: RoundTrip, what: &str, n: u64) -> anyhow::Result<LatencyRow> {
    let warm = n / 10;
    let (hist, queue_mean_us) = match kind {
        RoundTrip::Batcher => {
            let batcher = Arc::new(Batcher::spawn(zero_cost_config(64, Duration::ZERO), |_| Ok(Echo))?);
            let task = Arc::clone(&batcher);
            let (hist, queue_mean_us) = rt.block_on(rt.spawn(async move {
                let mut hist = histogram()?;
                let mut before = StatsSnapshot::default();
                for i in 0..warm + n {
                    if i == warm {
                        before = task.stats();
                    }
                    let sent = Instant::now();
                    let out = task.infer(Req(i)).await?;
                    let took = sent.elapsed();
                    ensure!(out == i, "answer {out} for request {i}");
                    if i >= warm {
                        hist.saturating_record(nanos(took).max(1));
                    }
                }
                let after = task.stats();
                let queued = after.queue_time.saturating_sub(before.queue_time).as_secs_f64();
                let requests = (after.requests - before.requests).max(1) as f64;
                anyhow::Ok((hist, Some(queued * 1e6 / requests)))
            }))??;
            drop(batcher);
            (hist, queue_mean_us)
        }
        RoundTrip::OneHop | RoundTrip::TwoHops => {
            let (first_tx, first_rx) = crossbeam_channel::unbounded::<(u64, Reply)>();
            let (second_tx, second_rx) = crossbeam_channel::unbounded::<(u64, Reply)>();
            let two = matches!(kind, RoundTrip::TwoHops);
            let hop = std::thread::spawn(move || {
                for (i, reply) in first_rx {
                    if two {
                        let _ = second_tx.send((i, reply));
                    } else {
                        let _ = reply.send(i);
                    }
                }
            });
            let last = std::thread::spawn(move || {
                for (i, reply) in second_rx {
                    let _ = reply.send(i);
                }
            });
            let hist = rt.block_on(rt.spawn(async move {
                let mut hist = histogram()?;
                for i in 0..warm + n {
                    let sent = Instant::now();
                    let (tx, rx) = tokio::sync::oneshot::channel();
                    first_tx.send((i, tx)).context("hop thread gone")?;
                    let out = rx.await?;
                    let took = sent.elapsed();
                    ensure!(out == i, "answer {out} for request {i}");
                    if i >= warm {
                        hist.saturating_record(nanos(took).max(1));
                    }
                }
                anyhow::Ok(hist)
            }))??;
            let _ = hop.join();
            let _ = last.join();
            (hist, None)
        }
    };
    let us = |q: f64| hist.value_at_quantile(q) as f64 / 1e3;
    Ok(LatencyRow {
        what: what.to_string(),
        requests: hist.len(),
        p50_us: us(0.5),
        p90_us: us(0.9),
        p99_us: us(0.99),
        max_us: hist.max() as f64 / 1e3,
        queue_mean_us,
    })
}

/// Closed loop: `tasks` tasks each calling `infer` in a loop; counts what the executor
/// ran during `seconds`, after a quarter of that (at least 0.2 s) unmeasured.
fn max_rate(rt: &Runtime, tasks: usize, delay_us: f64, seconds: f64) -> anyhow::Result<RateRow> {
    const MAX_BATCH: usize = 64;
    let delay = Duration::from_secs_f64(delay_us / 1e6);
    let batcher = Arc::new(Batcher::spawn(zero_cost_config(MAX_BATCH, delay), |_| Ok(Echo))?);
    let stop = Arc::new(AtomicBool::new(false));
    let handles: Vec<_> = (0..tasks as u64)
        .map(|t| {
            let (batcher, stop) = (Arc::clone(&batcher), Arc::clone(&stop));
            rt.spawn(async move {
                let (mut i, mut errors) = (t << 40, 0u64);
                while !stop.load(Ordering::Relaxed) {
                    if batcher.infer(Req(i)).await.is_err() {
                        errors += 1;
                    }
                    i += 1;
                }
                errors
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs_f64((seconds / 4.0).max(0.2)));
    let (before, started) = (batcher.stats(), Instant::now());
    std::thread::sleep(Duration::from_secs_f64(seconds));
    let (after, elapsed) = (batcher.stats(), started.elapsed().as_secs_f64());
    stop.store(true, Ordering::Relaxed);
    let mut errors = 0;
    rt.block_on(async {
        for h in handles {
            errors += h.await?;
        }
        anyhow::Ok(())
    })?;
    drop(batcher);
    let requests = after.requests - before.requests;
    Ok(RateRow {
        tasks,
        max_batch_size: MAX_BATCH,
        queue_delay_us: delay_us,
        seconds: elapsed,
        requests,
        errors,
        requests_per_s: requests as f64 / elapsed,
        mean_batch: mean_batch(&before, &after),
    })
}

fn mean_batch(before: &StatsSnapshot, after: &StatsSnapshot) -> f64 {
    let batches = after.batches - before.batches;
    if batches == 0 { 0.0 } else { (after.items - before.items) as f64 / batches as f64 }
}

/// How long the simulated executor really sleeps for batches of 1, half and full size.
fn calibrate_sleep(sim: Simulated, max_batch: usize, samples: usize) -> Vec<SleepRow> {
    let mut sizes = vec![1, max_batch.div_ceil(2), max_batch];
    sizes.dedup();
    sizes
        .into_iter()
        .map(|items| {
            let want = sim.cost(items);
            let (mut total, mut max) = (Duration::ZERO, Duration::ZERO);
            for _ in 0..samples {
                let t = Instant::now();
                std::thread::sleep(want);
                let took = t.elapsed();
                total += took;
                max = max.max(took);
            }
            SleepRow {
                requested_ms: want.as_secs_f64() * 1e3,
                samples,
                mean_ms: total.as_secs_f64() * 1e3 / samples.max(1) as f64,
                max_ms: max.as_secs_f64() * 1e3,
            }
        })
        .collect()
}

/// Outcomes of the requests of one open-loop run, written by their tasks.
#[derive(Debug)]
struct Tally {
    /// Latency in µs of answered requests sent in the measured window.
    latency: Mutex<Histogram<u64>>,
    /// Answers (of any request) that arrived within the measured window.
    answered_in_window: AtomicU64,
    rejected: AtomicU64,
    errors: AtomicU64,
    outstanding: AtomicUsize,
}

/// splitmix64: a small, fixed-seed generator for the arrival process.
#[derive(Debug)]
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in (0, 1].
    fn unit(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 1.0) / (1u64 << 53) as f64
    }
}

fn load_config(settings: &Settings, mode: Mode) -> BatcherConfig {
    let ms = |v: f64| Duration::from_secs_f64(v / 1e3);
    let base = BatcherConfig { instance_count: 1, ..BatcherConfig::default() };
    match mode {
        Mode::NoBatching => BatcherConfig { max_batch_size: 1, max_queue_delay: Duration::ZERO, ..base },
        Mode::FixedDelay => {
            BatcherConfig { max_batch_size: settings.max_batch, max_queue_delay: ms(settings.fixed_delay_ms), ..base }
        }
        Mode::Adaptive => BatcherConfig {
            max_batch_size: settings.max_batch,
            max_queue_delay: ms(settings.adaptive_max_delay_ms),
            target_p99: Some(ms(settings.target_p99_ms)),
            ..base
        },
    }
}

/// Open-loop load: this thread spawns each request onto `rt` at its intended time
/// (sleeping in between; tokio's timer has only millisecond resolution). A fresh batcher
/// per run; the warm-up lets the adaptive delay settle and is not measured.
fn open_loop(
    rt: &Runtime,
    settings: &Settings,
    sim: Simulated,
    mode: Mode,
    rate: f64,
    seed: u64,
) -> anyhow::Result<LoadRow> {
    const DRAIN_LIMIT: Duration = Duration::from_secs(30);
    let config = load_config(settings, mode);
    let max_batch_size = config.max_batch_size;
    let batcher = Arc::new(Batcher::spawn(config, move |_| Ok(sim))?);
    let tally = Arc::new(Tally {
        latency: Mutex::new(histogram()?),
        answered_in_window: AtomicU64::new(0),
        rejected: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        outstanding: AtomicUsize::new(0),
    });
    let mut rng = Rng(seed);
    let gap = |rng: &mut Rng| match settings.arrivals {
        Arrivals::Poisson => Duration::from_secs_f64(-rng.unit().ln() / rate),
        Arrivals::Constant => Duration::from_secs_f64(1.0 / rate),
    };
    let start = Instant::now() + Duration::from_millis(5);
    let window_start = start + Duration::from_secs_f64(settings.warmup_seconds);
    let window_end = window_start + Duration::from_secs_f64(settings.load_seconds);
    let mut before = None;
    let (mut delay_sum, mut delay_samples, mut last_sample) = (Duration::ZERO, 0u32, start);
    let (mut id, mut sent) = (0u64, 0u64);
    let mut intended = start + gap(&mut rng);
    while intended < window_end {
        let now = Instant::now();
        if intended > now {
            std::thread::sleep(intended - now);
        }
        let measured = intended >= window_start;
        if measured {
            sent += 1;
            let now = Instant::now();
            if before.is_none() {
                before = Some(batcher.stats());
                last_sample = now;
            }
            if now >= last_sample + Duration::from_millis(50) {
                delay_sum += batcher.stats().queue_delay;
                delay_samples += 1;
                last_sample = now;
            }
        }
        let (batcher, tally) = (Arc::clone(&batcher), Arc::clone(&tally));
        tally.outstanding.fetch_add(1, Ordering::AcqRel);
        rt.spawn(async move {
            let result = batcher.infer(Req(id)).await;
            let done = Instant::now();
            if (window_start..window_end).contains(&done) && result.is_ok() {
                tally.answered_in_window.fetch_add(1, Ordering::Relaxed);
            }
            match result {
                Ok(_) if measured => {
                    let us = u64::try_from((done - intended).as_micros()).unwrap_or(u64::MAX);
                    tally.latency.lock().unwrap_or_else(PoisonError::into_inner).saturating_record(us.max(1));
                }
                Ok(_) => {}
                Err(BatchError::QueueFull(_)) if measured => {
                    tally.rejected.fetch_add(1, Ordering::Relaxed);
                }
                Err(_) if measured => {
                    tally.errors.fetch_add(1, Ordering::Relaxed);
                }
                Err(_) => {}
            }
            tally.outstanding.fetch_sub(1, Ordering::AcqRel);
        });
        id += 1;
        intended += gap(&mut rng);
    }
    let now = Instant::now();
    if now < window_end {
        std::thread::sleep(window_end - now);
    }
    let final_delay = batcher.stats().queue_delay;
    let drain_until = Instant::now() + DRAIN_LIMIT;
    while tally.outstanding.load(Ordering::Acquire) > 0 && Instant::now() < drain_until {
        std::thread::sleep(Duration::from_millis(2));
    }
    let after = batcher.stats();
    let before = before.unwrap_or_default();
    let stuck = tally.outstanding.load(Ordering::Acquire);
    ensure!(stuck == 0, "{stuck} requests still unanswered {DRAIN_LIMIT:?} after the load stopped");
    drop(batcher);

    let hist = tally.latency.lock().unwrap_or_else(PoisonError::into_inner);
    let ms = |q: f64| hist.value_at_quantile(q) as f64 / 1e3;
    let batches = after.batches - before.batches;
    let batch = mean_batch(&before, &after);
    let compute = (after.compute_time.saturating_sub(before.compute_time)).as_secs_f64();
    Ok(LoadRow {
        mode,
        max_batch_size,
        offered_per_s: rate,
        sent,
        completed: hist.len(),
        rejected: tally.rejected.load(Ordering::Relaxed),
        errors: tally.errors.load(Ordering::Relaxed),
        achieved_per_s: tally.answered_in_window.load(Ordering::Relaxed) as f64 / settings.load_seconds,
        p50_ms: ms(0.5),
        p90_ms: ms(0.9),
        p99_ms: ms(0.99),
        max_ms: hist.max() as f64 / 1e3,
        mean_batch: batch,
        compute_ms_per_batch: if batches == 0 { 0.0 } else { compute * 1e3 / batches as f64 },
        model_ms_per_batch: settings.cost_fixed_ms + settings.cost_item_ms * batch,
        mean_delay_ms: if delay_samples == 0 {
            final_delay.as_secs_f64() * 1e3
        } else {
            delay_sum.as_secs_f64() * 1e3 / f64::from(delay_samples)
        },
        final_delay_ms: final_delay.as_secs_f64() * 1e3,
    })
}

fn print_tables(report: &Report) {
    println!("\nbatcher benchmark, {}\nmachine: {}", report.started_utc, report.machine);
    if !report.overhead_latency.is_empty() {
        print_latency(&report.overhead_latency);
    }
    if !report.overhead_rate.is_empty() {
        print_rate(&report.overhead_rate);
    }
    if !report.simulated.is_empty() {
        print_simulated(report);
    }
}

fn print_latency(rows: &[LatencyRow]) {
    println!("\n### Overhead: zero-cost executor, one request at a time (max batch 64, delay 0)\n");
    println!("| round trip | requests | p50 µs | p90 µs | p99 µs | max µs | admission → execution, mean µs |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for r in rows {
        let queued = r.queue_mean_us.map_or_else(|| "–".to_string(), |q| format!("{q:.1}"));
        println!(
            "| {} | {} | {:.1} | {:.1} | {:.1} | {:.0} | {queued} |",
            r.what, r.requests, r.p50_us, r.p90_us, r.p99_us, r.max_us
        );
    }
}

fn print_rate(rows: &[RateRow]) {
    println!("\n### Overhead: zero-cost executor, maximum sustained rate (closed loop)\n");
    println!("| tasks | max batch | queue delay µs | req/s | mean batch | errors |");
    println!("|---:|---:|---:|---:|---:|---:|");
    for r in rows {
        println!(
            "| {} | {} | {:.0} | {:.0} | {:.1} | {} |",
            r.tasks, r.max_batch_size, r.queue_delay_us, r.requests_per_s, r.mean_batch, r.errors
        );
    }
}

fn print_simulated(report: &Report) {
    let s = &report.settings;
    println!(
        "\n### Simulated executor: {} + {}·batch ms (std::thread::sleep), 1 instance, {} arrivals, {} s per load\n",
        s.cost_fixed_ms,
        s.cost_item_ms,
        match s.arrivals {
            Arrivals::Poisson => "Poisson",
            Arrivals::Constant => "constant-rate",
        },
        s.load_seconds
    );
    println!("| sleep requested ms | measured mean ms | max ms |");
    println!("|---:|---:|---:|");
    for r in &report.sleep_calibration {
        println!("| {:.2} | {:.3} | {:.3} |", r.requested_ms, r.mean_ms, r.max_ms);
    }
    println!(
        "\nModes: no batching = max batch 1; fixed delay = max batch {}, {} ms; adaptive = max batch {}, \
         target p99 {} ms, delay ≤ {} ms. Latency from intended send time to answer; queue bound {} \
         (requests beyond it are rejected, not in the percentiles).\n",
        s.max_batch, s.fixed_delay_ms, s.max_batch, s.target_p99_ms, s.adaptive_max_delay_ms, s.max_queue_size
    );
    println!(
        "| mode | offered req/s | achieved req/s | p50 ms | p99 ms | max ms | mean batch | ms/batch (a+b·n) | delay ms mean / final | rejected |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in &report.simulated {
        println!(
            "| {} | {:.0} | {:.0} | {:.2} | {:.2} | {:.1} | {:.1} | {:.2} ({:.2}) | {:.1} / {:.1} | {} |",
            r.mode.label(),
            r.offered_per_s,
            r.achieved_per_s,
            r.p50_ms,
            r.p99_ms,
            r.max_ms,
            r.mean_batch,
            r.compute_ms_per_batch,
            r.model_ms_per_batch,
            r.mean_delay_ms,
            r.final_delay_ms,
            r.rejected + r.errors,
        );
    }
}
