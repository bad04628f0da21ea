//! The per-batch measurement of `kiln perf`: one closed loop per stream thread over
//! warm-up plus the measured duration, merged into one [`BatchResult`].

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow};
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use kiln_cuda::engine::{ExecutionContext, StageTimes};
use kiln_engine::Tensor;
use serde_json::{Value, json};

use super::PerfArgs;

/// What one stream thread measured.
pub(super) struct StreamStats {
    latency_us: Histogram<u64>,
    stages: StageTimes,
    runs: u64,
    first_start: Option<Instant>,
    last_end: Option<Instant>,
}

/// One batch size's merged result.
pub(super) struct BatchResult {
    batch: usize,
    runs: u64,
    elapsed_s: f64,
    prepare_s: f64,
    latency_us: Histogram<u64>,
    stages: StageTimes,
}

impl BatchResult {
    pub(super) fn samples_per_s(&self) -> f64 {
        self.batches_per_s() * self.batch as f64
    }

    pub(super) fn batches_per_s(&self) -> f64 {
        if self.elapsed_s > 0.0 { self.runs as f64 / self.elapsed_s } else { 0.0 }
    }

    pub(super) fn ms(&self, q: f64) -> f64 {
        self.latency_us.value_at_quantile(q) as f64 / 1e3
    }

    pub(super) fn stage_mean(&self, pick: fn(&StageTimes) -> f64) -> f64 {
        if self.runs == 0 { 0.0 } else { pick(&self.stages) / self.runs as f64 }
    }

    pub(super) fn to_json(&self, seq: Option<usize>) -> Value {
        json!({
            "batch": self.batch,
            "seq": seq,
            "runs": self.runs,
            "elapsed_s": self.elapsed_s,
            "prepare_s": self.prepare_s,
            "samples_per_s": self.samples_per_s(),
            "batches_per_s": self.batches_per_s(),
            "latency_ms": {
                "mean": self.latency_us.mean() / 1e3,
                "min": self.latency_us.min() as f64 / 1e3,
                "p50": self.ms(0.50),
                "p90": self.ms(0.90),
                "p99": self.ms(0.99),
                "max": self.latency_us.max() as f64 / 1e3,
            },
            "h2d_ms": self.stage_mean(|s| s.h2d_ms),
            "compute_ms": self.stage_mean(|s| s.compute_ms),
            "d2h_ms": self.stage_mean(|s| s.d2h_ms),
        })
    }
}

pub(super) fn histogram() -> anyhow::Result<Histogram<u64>> {
    // 1 µs to 10 min at 3 significant digits.
    Histogram::new_with_bounds(1, 600_000_000, 3).context("latency histogram")
}

pub(super) fn progress(batch: usize, total: Duration, show: bool) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(total.as_millis() as u64);
    let style = ProgressStyle::with_template("{spinner} batch {prefix:>4} [{bar:30}] {msg}")
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
    bar.set_style(style);
    bar.set_prefix(batch.to_string());
    bar
}

/// Prepares every context for `inputs` (tactics, CUDA graph capture: once, not
/// timed), then runs all streams concurrently for warm-up plus the duration.
pub(super) fn measure_batch(
    contexts: &mut [ExecutionContext],
    inputs: &[Tensor],
    batch: usize,
    args: &PerfArgs,
    show: bool,
) -> anyhow::Result<BatchResult> {
    let warmup = Duration::from_secs_f64(args.warmup);
    let duration = Duration::from_secs_f64(args.duration);
    let bar = progress(batch, warmup + duration, show);
    bar.set_message("preparing (tactics, CUDA graph)");
    bar.enable_steady_tick(Duration::from_millis(120));
    let prepared = Instant::now();
    for ctx in contexts.iter_mut() {
        ctx.prepare(inputs)?;
    }
    let prepare_s = prepared.elapsed().as_secs_f64();

    let stop = AtomicBool::new(false);
    let measured = AtomicU64::new(0);
    let start = Instant::now();
    let (warm_end, end) = (start + warmup, start + warmup + duration);
    let results = std::thread::scope(|s| {
        let handles: Vec<_> = contexts
            .iter_mut()
            .map(|ctx| {
                let (stop, measured) = (&stop, &measured);
                s.spawn(move || {
                    let r = stream_loop(ctx, inputs, warm_end, end, stop, measured);
                    if r.is_err() {
                        stop.store(true, Ordering::Relaxed);
                    }
                    r
                })
            })
            .collect();
        while !handles.iter().all(|h| h.is_finished()) {
            let now = Instant::now();
            bar.set_position(now.saturating_duration_since(start).as_millis() as u64);
            if now < warm_end {
                bar.set_message("warm-up");
            } else {
                bar.set_message(format!("{} batches", measured.load(Ordering::Relaxed)));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        handles
            .into_iter()
            .map(|h| h.join().map_err(|_| anyhow!("a stream thread panicked")).and_then(|r| r))
            .collect::<Vec<_>>()
    });
    bar.finish_and_clear();
    merge(results, batch, prepare_s)
}

pub(super) fn merge(
    results: Vec<anyhow::Result<StreamStats>>,
    batch: usize,
    prepare_s: f64,
) -> anyhow::Result<BatchResult> {
    let mut out = BatchResult {
        batch,
        runs: 0,
        elapsed_s: 0.0,
        prepare_s,
        latency_us: histogram()?,
        stages: StageTimes::default(),
    };
    let (mut first, mut last): (Option<Instant>, Option<Instant>) = (None, None);
    for r in results {
        let s = r?;
        out.latency_us.add(&s.latency_us).context("merging latency histograms")?;
        out.runs += s.runs;
        out.stages.h2d_ms += s.stages.h2d_ms;
        out.stages.compute_ms += s.stages.compute_ms;
        out.stages.d2h_ms += s.stages.d2h_ms;
        first = match (first, s.first_start) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        last = match (last, s.last_end) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
    }
    if let (Some(a), Some(b)) = (first, last) {
        out.elapsed_s = b.saturating_duration_since(a).as_secs_f64();
    }
    Ok(out)
}

/// One stream's closed loop. Runs started before `warm_end` are warm-up; every
/// stream measures at least one run, however long it takes.
pub(super) fn stream_loop(
    ctx: &mut ExecutionContext,
    inputs: &[Tensor],
    warm_end: Instant,
    end: Instant,
    stop: &AtomicBool,
    measured: &AtomicU64,
) -> anyhow::Result<StreamStats> {
    let mut stats = StreamStats {
        latency_us: histogram()?,
        stages: StageTimes::default(),
        runs: 0,
        first_start: None,
        last_end: None,
    };
    while !stop.load(Ordering::Relaxed) {
        let t0 = Instant::now();
        if t0 >= end && stats.runs > 0 {
            break;
        }
        let (_, times) = ctx.run_timed(inputs)?;
        let t1 = Instant::now();
        if t0 < warm_end {
            continue;
        }
        stats.latency_us.saturating_record(t1.duration_since(t0).as_micros().max(1) as u64);
        stats.stages.h2d_ms += times.h2d_ms;
        stats.stages.compute_ms += times.compute_ms;
        stats.stages.d2h_ms += times.d2h_ms;
        stats.runs += 1;
        stats.first_start.get_or_insert(t0);
        stats.last_end = Some(t1);
        measured.fetch_add(1, Ordering::Relaxed);
    }
    Ok(stats)
}

pub(super) fn print_header() {
    println!(
        "{:>6} {:>5} {:>12} {:>10} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>10} {:>8} {:>8}",
        "batch",
        "seq",
        "samples/s",
        "batches/s",
        "mean ms",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "max ms",
        "H2D ms",
        "compute ms",
        "D2H ms",
        "runs"
    );
}

pub(super) fn print_row(r: &BatchResult, seq: Option<usize>) {
    println!(
        "{:>6} {:>5} {:>12.1} {:>10.1} {:>8.3} {:>8.3} {:>8.3} {:>8.3} {:>8.3} {:>8.3} {:>10.3} {:>8.3} {:>8}",
        r.batch,
        seq.map_or_else(|| "-".to_owned(), |s| s.to_string()),
        r.samples_per_s(),
        r.batches_per_s(),
        r.latency_us.mean() / 1e3,
        r.ms(0.50),
        r.ms(0.90),
        r.ms(0.99),
        r.latency_us.max() as f64 / 1e3,
        r.stage_mean(|s| s.h2d_ms),
        r.stage_mean(|s| s.compute_ms),
        r.stage_mean(|s| s.d2h_ms),
        r.runs
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merged_stats_add_up() -> anyhow::Result<()> {
        let t = Instant::now();
        let stream = |runs: u64, ms: f64, offset_ms: u64| -> anyhow::Result<StreamStats> {
            let mut h = histogram()?;
            for _ in 0..runs {
                h.record(1000)?;
            }
            Ok(StreamStats {
                latency_us: h,
                stages: StageTimes { h2d_ms: ms, compute_ms: 2.0 * ms, d2h_ms: 0.0 },
                runs,
                first_start: Some(t + Duration::from_millis(offset_ms)),
                last_end: Some(t + Duration::from_millis(offset_ms + 500)),
            })
        };
        let r = merge(vec![stream(10, 1.0, 0), stream(30, 3.0, 500)], 4, 0.0)?;
        assert_eq!(r.runs, 40);
        assert!((r.elapsed_s - 1.0).abs() < 1e-9);
        assert!((r.batches_per_s() - 40.0).abs() < 1e-6);
        assert!((r.samples_per_s() - 160.0).abs() < 1e-6);
        assert!((r.stage_mean(|s| s.compute_ms) - 0.2).abs() < 1e-9);
        assert!((r.ms(0.5) - 1.0).abs() < 0.01);
        assert!(merge(vec![Err(anyhow!("boom"))], 1, 0.0).is_err());
        Ok(())
    }
}
