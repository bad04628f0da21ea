//! One level of a sweep: start the workers, warm up, measure windows until stable or
//! capped, stop, and summarise.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

use super::client::Connector;
use super::driver::{ConnPlan, Context, Worker};
use super::payload::Workload;
use super::report::LevelReport;
use super::scrape::{Sample, ServerSide};
use super::stats::{Latency, SendLag, Shard, Window, is_stable, metric_ms};
use super::ticker::Ticker;
use super::{LoadConfig, LoadError, Mode};

/// Default connection count for open loop over HTTP/1.1: enough that a server answering
/// in a few milliseconds can take tens of thousands of requests per second.
const OPEN_LOOP_H1_CONNECTIONS: usize = 32;

/// How often the controller refreshes the progress line and checks the request cap.
const TICK: Duration = Duration::from_millis(100);

/// What one level runs.
#[derive(Debug, Clone)]
pub(crate) struct LevelSpec {
    pub concurrency: Option<usize>,
    pub rate: Option<f64>,
    pub conns: Vec<ConnPlan>,
    pub threads: usize,
}

impl LevelSpec {
    fn label(&self) -> String {
        match (self.concurrency, self.rate) {
            (Some(c), _) => format!("concurrency {c}"),
            (_, Some(r)) => format!("rate {r:.0}/s"),
            _ => String::new(),
        }
    }
}

fn cores() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

/// The levels of a run, in order.
pub(crate) fn plans(config: &LoadConfig) -> Vec<LevelSpec> {
    let threads_for = |conns: usize| config.threads.unwrap_or_else(cores).min(conns).max(1);
    match &config.mode {
        Mode::Closed { concurrency } => concurrency
            .iter()
            .map(|&c| {
                let conns: Vec<ConnPlan> = if config.http2 {
                    let m = config.connections.unwrap_or_else(|| threads_for(c)).clamp(1, c);
                    (0..m).map(|i| ConnPlan::Closed { lanes: c / m + usize::from(i < c % m) }).collect()
                } else {
                    vec![ConnPlan::Closed { lanes: 1 }; c]
                };
                LevelSpec { concurrency: Some(c), rate: None, threads: threads_for(conns.len()), conns }
            })
            .collect(),
        Mode::Open { rates, .. } => rates
            .iter()
            .map(|&rate| {
                let n = config.connections.unwrap_or(if config.http2 { cores() } else { OPEN_LOOP_H1_CONNECTIONS });
                let gap = 1.0 / rate;
                // Staggered starts: with constant arrivals the merged stream is evenly spaced.
                let conns = (0..n)
                    .map(|i| ConnPlan::Open {
                        rate: rate / n as f64,
                        offset: Duration::from_secs_f64(gap * i as f64),
                        max_streams: config.max_streams,
                    })
                    .collect();
                LevelSpec { concurrency: None, rate: Some(rate), threads: threads_for(n), conns }
            })
            .collect(),
    }
}

pub(crate) type Scraper<'a> = Option<&'a dyn Fn(Option<&str>) -> Result<Sample, LoadError>>;

pub(crate) fn run(
    config: &LoadConfig,
    connector: &Connector,
    workload: &Arc<Workload>,
    spec: &LevelSpec,
    scraper: Scraper<'_>,
) -> Result<LevelReport, LoadError> {
    let timing = &config.timing;
    let arrival = match config.mode {
        Mode::Open { arrival, .. } => arrival,
        Mode::Closed { .. } => super::Arrival::Constant,
    };
    let (ticker, ticker_thread) = Ticker::start().map_err(LoadError::Runtime)?;
    let ctx = Arc::new(Context {
        connector: connector.clone(),
        workload: workload.clone(),
        timeout: config.timeout,
        check_body: config.payload.check_labels,
        arrival,
        start: Instant::now(),
        ticker: ticker.clone(),
    });
    let shards: Vec<Arc<Shard>> = (0..spec.threads).map(|_| Arc::new(Shard::new())).collect();
    let mut per_thread: Vec<Vec<(usize, ConnPlan)>> = vec![Vec::new(); spec.threads];
    for (i, plan) in spec.conns.iter().enumerate() {
        per_thread[i % spec.threads].push((i, *plan));
    }
    let mut workers = Vec::with_capacity(spec.threads);
    for (i, conns) in per_thread.into_iter().enumerate() {
        match Worker::spawn(i, ctx.clone(), shards[i].clone(), conns) {
            Ok(w) => workers.push(w),
            Err(e) => {
                workers.into_iter().for_each(Worker::join);
                ticker.stop();
                let _ = ticker_thread.join();
                return Err(e);
            }
        }
    }
    let bar = progress_bar(config.progress, &spec.label());
    let done = || shards.iter().map(|s| s.done.load(Ordering::Relaxed)).sum::<u64>();
    let harvest = || {
        let mut w = Window::new();
        shards.iter().for_each(|s| w.merge(&s.take()));
        w
    };

    bar.set_message("warming up");
    std::thread::sleep(timing.warmup);
    let _ = harvest();
    let model = config.payload.model.as_deref();
    let before = scraper.map(|s| s(model));
    let base = done();

    let mut windows: Vec<(Window, Duration)> = Vec::new();
    let mut points: Vec<(f64, f64)> = Vec::new();
    let mut window_start = Instant::now();
    let stable = loop {
        let deadline = window_start + timing.window;
        let mut capped = false;
        loop {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            std::thread::sleep(TICK.min(deadline - now));
            capped = timing.max_requests.is_some_and(|cap| done() - base >= cap);
            if capped {
                break;
            }
            let last =
                points.last().map(|p| format!(", last window {:.0} req/s, {:.2} ms", p.0, p.1)).unwrap_or_default();
            bar.set_message(format!("window {}: {} done{last}", windows.len() + 1, done() - base));
        }
        let w = harvest();
        let now = Instant::now();
        let elapsed = now - window_start;
        window_start = now;
        points.push((w.ok as f64 / elapsed.as_secs_f64(), metric_ms(&w.latency, config.percentile)));
        windows.push((w, elapsed));
        let stable = is_stable(&points, timing.stable_windows, timing.stability);
        if stable || capped || windows.len() >= timing.max_windows {
            break stable;
        }
    };
    workers.into_iter().for_each(Worker::join);
    ticker.stop();
    let _ = ticker_thread.join();
    let after = scraper.map(|s| s(model));

    // A stable level reports its stable windows; an unstable one everything it measured.
    let used = if stable { &windows[windows.len() - timing.stable_windows..] } else { &windows[..] };
    let mut total = Window::new();
    let mut duration = Duration::ZERO;
    for (w, d) in used {
        total.merge(w);
        duration += *d;
    }
    let secs = duration.as_secs_f64().max(f64::MIN_POSITIVE);
    let server = match (before, after) {
        (Some(Ok(b)), Some(Ok(a))) => ServerSide::between(&b, &a),
        _ => None,
    };
    let report = LevelReport {
        concurrency: spec.concurrency,
        target_rate: spec.rate,
        connections: spec.conns.len(),
        threads: spec.threads,
        duration_s: secs,
        requests: total.ok,
        items: total.items,
        throughput_rps: total.ok as f64 / secs,
        items_per_s: total.items as f64 / secs,
        error_count: total.error_total(),
        errors: total.errors.iter().map(|(k, n)| (k.key(), *n)).collect(),
        latency: Latency::of(&total.latency),
        send_lag: SendLag::of(&total.lag),
        metric_ms: metric_ms(&total.latency, config.percentile),
        stable,
        windows: used.len(),
        server,
    };
    bar.finish_with_message(format!(
        "{:.0} req/s, p50 {:.2} ms, p99 {:.2} ms, {} errors{}",
        report.throughput_rps,
        report.latency.p50_ms,
        report.latency.p99_ms,
        report.error_count,
        if stable { "" } else { " (unstable)" }
    ));
    Ok(report)
}

fn progress_bar(enabled: bool, label: &str) -> ProgressBar {
    if !enabled {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new_spinner();
    if let Ok(style) = ProgressStyle::with_template("{spinner} {prefix:>18} [{elapsed}] {wide_msg}") {
        bar.set_style(style);
    }
    bar.set_prefix(label.to_string());
    bar.enable_steady_tick(TICK);
    bar
}
