//! `kiln perf` (trtexec's run half): loads a plan on the CUDA engine once and,
//! per batch size, drives one execution context per stream thread in a closed
//! loop for a fixed time, reporting throughput, latency percentiles and the
//! H2D / compute / D2H split measured with CUDA events.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use clap::{Args, ValueEnum};
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use kiln_cuda::CudaError;
use kiln_cuda::engine::{Engine, EngineOptions, ExecutionContext, StageTimes, TacticMode};
use kiln_engine::{DType, Dim, ModelMetadata, Tensor, TensorData, TensorSpec, f16};
use serde_json::{Value, json};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OnOff {
    On,
    Off,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TacticsArg {
    /// Time every candidate on the GPU (with the timing cache).
    Time,
    /// The libraries' first heuristic choice (fastest load).
    Heuristic,
}

#[derive(Args, Debug)]
pub struct PerfArgs {
    /// The plan to run (from `kiln build`).
    plan: PathBuf,
    /// Batch sizes to measure, one after another: repeat the flag or give a list (1,8,64,256).
    #[arg(long, value_delimiter = ',', value_parser = positive, default_value = "1")]
    batch: Vec<usize>,
    /// Length of every other dynamic dimension (the sequence of text models).
    #[arg(long, value_parser = positive, default_value_t = 128)]
    seq: usize,
    /// Execution contexts (each its own CUDA stream and thread) running concurrently.
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=64), default_value_t = 1)]
    streams: u16,
    /// Replay each batch size's steps as one captured CUDA graph.
    #[arg(long, value_enum, default_value = "on")]
    cuda_graph: OnOff,
    /// Seconds measured per batch size.
    #[arg(long, value_parser = seconds, default_value = "10")]
    duration: f64,
    /// Seconds run before measuring, per batch size.
    #[arg(long, value_parser = seconds_or_zero, default_value = "2")]
    warmup: f64,
    /// CUDA device ordinal.
    #[arg(long, default_value_t = 0)]
    device: usize,
    /// Timing cache file for tactic selection, read and updated.
    #[arg(long, env = "KILN_TIMING_CACHE")]
    timing_cache: Option<PathBuf>,
    /// How GEMM and convolution algorithms are chosen when the plan and cache have none.
    #[arg(long, value_enum, default_value = "time")]
    tactics: TacticsArg,
    /// Also write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Hide the progress bars.
    #[arg(long)]
    no_progress: bool,
}

fn positive(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(format!("expected an integer ≥ 1, got {s:?}")),
    }
}

fn seconds_or_zero(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(x) if x.is_finite() && (0.0..=86_400.0).contains(&x) => Ok(x),
        _ => Err(format!("expected seconds between 0 and 86400, got {s:?}")),
    }
}

fn seconds(s: &str) -> Result<f64, String> {
    match seconds_or_zero(s) {
        Ok(x) if x > 0.0 => Ok(x),
        _ => Err(format!("expected seconds above 0 (at most 86400), got {s:?}")),
    }
}

/// What one stream thread measured.
struct StreamStats {
    latency_us: Histogram<u64>,
    stages: StageTimes,
    runs: u64,
    first_start: Option<Instant>,
    last_end: Option<Instant>,
}

/// One batch size's merged result.
struct BatchResult {
    batch: usize,
    runs: u64,
    elapsed_s: f64,
    prepare_s: f64,
    latency_us: Histogram<u64>,
    stages: StageTimes,
}

impl BatchResult {
    fn samples_per_s(&self) -> f64 {
        self.batches_per_s() * self.batch as f64
    }

    fn batches_per_s(&self) -> f64 {
        if self.elapsed_s > 0.0 { self.runs as f64 / self.elapsed_s } else { 0.0 }
    }

    fn ms(&self, q: f64) -> f64 {
        self.latency_us.value_at_quantile(q) as f64 / 1e3
    }

    fn stage_mean(&self, pick: fn(&StageTimes) -> f64) -> f64 {
        if self.runs == 0 { 0.0 } else { pick(&self.stages) / self.runs as f64 }
    }

    fn to_json(&self, seq: Option<usize>) -> Value {
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

fn histogram() -> anyhow::Result<Histogram<u64>> {
    // 1 µs to 10 min at 3 significant digits.
    Histogram::new_with_bounds(1, 600_000_000, 3).context("latency histogram")
}

/// Errors come out as one line (`{:#}` joins the causes): scripts grep them
/// and a missing GPU is an expected outcome, not a crash report.
pub fn perf(args: &PerfArgs) -> anyhow::Result<()> {
    run(args).map_err(|e| anyhow!("kiln perf: {e:#}"))
}

fn run(args: &PerfArgs) -> anyhow::Result<()> {
    let opts = EngineOptions {
        device: args.device,
        cuda_graphs: args.cuda_graph == OnOff::On,
        tactics: match args.tactics {
            TacticsArg::Time => TacticMode::Time,
            TacticsArg::Heuristic => TacticMode::Heuristic,
        },
        timing_cache: args.timing_cache.clone(),
        max_batch: None,
        // kiln perf measures exactly the batch sizes asked for.
        batch_buckets: false,
    };
    let loaded = Instant::now();
    let engine = Engine::load_file(&args.plan, &opts)
        .with_context(|| format!("cannot load {} on the CUDA engine", args.plan.display()))?;
    let load_s = loaded.elapsed().as_secs_f64();
    let max = engine.max_batch();
    if let Some(b) = args.batch.iter().find(|&&b| b > max) {
        bail!("--batch {b} exceeds the plan's largest batch {max} (rebuild with a larger --batch profile)");
    }
    let has_seq = seq_dims(engine.metadata());
    let seq = has_seq.then_some(args.seq);
    let streams = usize::from(args.streams);
    let mut contexts = (0..streams).map(|_| engine.context()).collect::<Result<Vec<_>, CudaError>>()?;
    let show = !args.no_progress && std::io::stderr().is_terminal();

    println!(
        "kiln perf: {} on {} ({}), {streams} stream(s), CUDA graph {}, tactics {}, loaded in {load_s:.2} s",
        args.plan.display(),
        engine.device_name(),
        engine.arch(),
        if opts.cuda_graphs { "on" } else { "off" },
        if opts.tactics == TacticMode::Time { "time" } else { "heuristic" },
    );
    println!("  warm-up {:.1} s, {:.1} s measured per batch size{}", args.warmup, args.duration, seq_note(seq));
    print_header();

    let mut rows = Vec::new();
    let mut failures = Vec::new();
    for (i, &batch) in args.batch.iter().enumerate() {
        let outcome = make_inputs(engine.metadata(), batch, args.seq, 0x6b69_6c6e ^ i as u64)
            .and_then(|inputs| measure_batch(&mut contexts, &inputs, batch, args, show));
        match outcome {
            Ok(r) => {
                print_row(&r, seq);
                rows.push(r.to_json(seq));
            }
            Err(e) => {
                println!("{batch:>6}  failed: {e:#}");
                rows.push(json!({ "batch": batch, "seq": seq, "error": format!("{e:#}") }));
                failures.push(batch);
            }
        }
    }
    if let Err(e) = engine.save_timing_cache() {
        eprintln!("warning: timing cache not saved: {e}");
    }
    if let Some(path) = &args.json {
        let doc = json!({
            "tool": "kiln perf",
            "kiln_version": env!("CARGO_PKG_VERSION"),
            "plan": args.plan.display().to_string(),
            "model": model_name(&args.plan),
            "device": engine.device_name(),
            "arch": engine.arch(),
            "streams": streams,
            "cuda_graph": opts.cuda_graphs,
            "tactics": if opts.tactics == TacticMode::Time { "time" } else { "heuristic" },
            "warmup_s": args.warmup,
            "duration_s": args.duration,
            "load_s": load_s,
            "max_batch": max,
            "results": rows,
        });
        let text = serde_json::to_string_pretty(&doc)?;
        std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))?;
    }
    if !failures.is_empty() {
        bail!("batch size(s) {failures:?} failed");
    }
    Ok(())
}

fn model_name(plan: &Path) -> String {
    plan.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default()
}

fn seq_note(seq: Option<usize>) -> String {
    seq.map(|s| format!(", sequence {s}")).unwrap_or_default()
}

/// Whether any input has a dynamic dimension besides the batch axis.
fn seq_dims(meta: &ModelMetadata) -> bool {
    meta.inputs.iter().any(|s| s.shape.iter().skip(1).any(|d| *d == Dim::Dynamic))
}

/// Random inputs for `meta` at `batch` (axis 0) and `seq` (every other dynamic
/// axis): floats uniform in [-1, 1], bytes uniform, masks all ones, token type
/// ids zero, position ids counting along the last axis, other integers
/// (token ids) in [0, 1000) so that they index any vocabulary.
fn make_inputs(meta: &ModelMetadata, batch: usize, seq: usize, seed: u64) -> anyhow::Result<Vec<Tensor>> {
    let mut rng = fastrand::Rng::with_seed(seed);
    meta.inputs.iter().map(|spec| make_input(spec, batch, seq, &mut rng)).collect()
}

fn make_input(spec: &TensorSpec, batch: usize, seq: usize, rng: &mut fastrand::Rng) -> anyhow::Result<Tensor> {
    let dims = spec.concrete_shape(batch, seq);
    let n: usize = dims.iter().product();
    let last = dims.last().copied().unwrap_or(1).max(1);
    let name = spec.name.to_ascii_lowercase();
    let mut ints = || -> Vec<i64> {
        if name.contains("mask") {
            vec![1; n]
        } else if name.contains("type") || name.contains("segment") {
            vec![0; n]
        } else if name.contains("position") {
            (0..n).map(|i| (i % last) as i64).collect()
        } else {
            (0..n).map(|_| rng.i64(0..1000)).collect()
        }
    };
    let data = match spec.dtype {
        DType::F32 => TensorData::F32((0..n).map(|_| rng_unit(rng)).collect()),
        DType::F16 => TensorData::F16((0..n).map(|_| f16::from_f32(rng_unit(rng))).collect()),
        DType::I64 => TensorData::I64(ints()),
        DType::I32 => TensorData::I32(ints().into_iter().map(|x| x as i32).collect()),
        DType::U8 => TensorData::U8((0..n).map(|_| rng.u8(..)).collect()),
        DType::Bool => TensorData::Bool(vec![true; n]),
        other => bail!("input {}: cannot generate {other} data", spec.name),
    };
    Tensor::new(dims, data).with_context(|| format!("input {}", spec.name))
}

fn rng_unit(rng: &mut fastrand::Rng) -> f32 {
    rng.f32() * 2.0 - 1.0
}

fn progress(batch: usize, total: Duration, show: bool) -> ProgressBar {
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
fn measure_batch(
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

fn merge(results: Vec<anyhow::Result<StreamStats>>, batch: usize, prepare_s: f64) -> anyhow::Result<BatchResult> {
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
fn stream_loop(
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

fn print_header() {
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

fn print_row(r: &BatchResult, seq: Option<usize>) {
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

    fn spec(name: &str, dtype: DType, shape: Vec<Dim>) -> TensorSpec {
        TensorSpec { name: name.into(), dtype, shape }
    }

    #[test]
    fn inputs_follow_batch_seq_and_names() -> anyhow::Result<()> {
        let meta = ModelMetadata {
            inputs: vec![
                spec("input_ids", DType::I64, vec![Dim::Dynamic, Dim::Dynamic]),
                spec("attention_mask", DType::I64, vec![Dim::Dynamic, Dim::Dynamic]),
                spec("token_type_ids", DType::I64, vec![Dim::Dynamic, Dim::Dynamic]),
                spec("image", DType::U8, vec![Dim::Dynamic, Dim::Fixed(3), Dim::Fixed(4)]),
                spec("x", DType::F16, vec![Dim::Dynamic, Dim::Fixed(5)]),
            ],
            outputs: vec![],
        };
        assert!(seq_dims(&meta));
        let t = make_inputs(&meta, 3, 7, 1)?;
        assert_eq!(t[0].shape(), &[3, 7]);
        let TensorData::I64(ids) = t[0].data() else { bail!("ids not i64") };
        assert!(ids.iter().all(|&x| (0..1000).contains(&x)));
        assert_eq!(t[1].data(), &TensorData::I64(vec![1; 21]));
        assert_eq!(t[2].data(), &TensorData::I64(vec![0; 21]));
        assert_eq!(t[3].shape(), &[3, 3, 4]);
        let TensorData::F16(x) = t[4].data() else { bail!("x not f16") };
        assert!(x.iter().all(|v| v.to_f32().abs() <= 1.0));
        Ok(())
    }

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
