//! `kiln perf` (trtexec's run half): loads each plan on the CUDA engine once and,
//! per batch size, drives one execution context per stream thread in a closed
//! loop for a fixed time, reporting throughput, latency percentiles and the
//! H2D / compute / D2H split measured with CUDA events. `--table` then writes one
//! markdown row per plan (see `perf_table.rs`).

mod measure;

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, anyhow, bail};
use clap::{Args, ValueEnum};
use kiln_cuda::CudaError;
use kiln_cuda::engine::{Engine, EngineOptions, TacticMode};
use kiln_engine::{DType, Dim, ModelMetadata, Tensor, TensorData, TensorSpec, f16};
use serde_json::{Value, json};

use self::measure::{measure_batch, print_header, print_row};
use crate::perf_table::{self, BatchPoint, PlanRow};

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
    /// The plans to run (from `kiln build`), measured one after another.
    #[arg(required = true)]
    plans: Vec<PathBuf>,
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
    /// Also write the results as JSON here (one plan: one document; several: an array of
    /// them, one per plan).
    #[arg(long)]
    json: Option<PathBuf>,
    /// After measuring, write a markdown table (per plan: precision, batch-1 latency, best
    /// throughput, plan size; the GPU) into this file between the markers
    /// `<!-- kiln perf --table begin -->` and `<!-- kiln perf --table end -->`, appending a
    /// section with them when it has none, and print it.
    #[arg(long)]
    table: Option<PathBuf>,
    /// With --table: PyTorch rows for the same models from `torch_baseline.py --json`.
    #[arg(long, requires = "table")]
    torch_json: Option<PathBuf>,
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

/// Errors come out as one line (`{:#}` joins the causes): scripts grep them
/// and a missing GPU is an expected outcome, not a crash report.
pub fn perf(args: &PerfArgs) -> anyhow::Result<()> {
    run(args).map_err(|e| anyhow!("kiln perf: {e:#}"))
}

/// What one plan gave: its JSON document and, for the table, its row.
struct PlanRun {
    path: PathBuf,
    doc: Value,
    row: PlanRow,
    device: Option<String>,
    /// The plan could not be loaded or run at all.
    error: Option<anyhow::Error>,
}

fn run(args: &PerfArgs) -> anyhow::Result<()> {
    // What the table needs is read before measuring: a bad file should not cost a benchmark run.
    let torch = match &args.torch_json {
        Some(p) => {
            let text = std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))?;
            Some(perf_table::parse_torch(&text, &p.display().to_string())?)
        }
        None => None,
    };
    if let Some(path) = &args.table {
        perf_table::check_markers(&read_table_file(path)?).with_context(|| format!("--table {}", path.display()))?;
    }
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
    let mut runs = Vec::new();
    for (i, path) in args.plans.iter().enumerate() {
        if i > 0 {
            println!();
        }
        let run = run_plan(path, args, &opts);
        if let Some(e) = &run.error
            && args.plans.len() > 1
        {
            let precision =
                if run.row.precision.is_empty() { String::new() } else { format!(" ({})", run.row.precision) };
            println!("kiln perf: {}{precision}: failed: {e:#}", path.display());
        }
        runs.push(run);
    }
    // Nothing ran (no GPU, unreadable plans): an error, and no JSON or table of failures.
    if runs.iter().all(|r| r.error.is_some()) {
        let mut errors = runs.into_iter().filter_map(|r| r.error.map(|e| (r.path, e)));
        if args.plans.len() == 1
            && let Some((_, e)) = errors.next()
        {
            return Err(e);
        }
        let all: Vec<String> = errors.map(|(p, e)| format!("{}: {e:#}", p.display())).collect();
        bail!("no plan could be measured: {}", all.join("; "));
    }
    if let Some(path) = &args.json {
        let doc = match runs.as_slice() {
            [one] => one.doc.clone(),
            many => Value::Array(many.iter().map(|r| r.doc.clone()).collect()),
        };
        let text = serde_json::to_string_pretty(&doc)?;
        std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))?;
    }
    if let Some(path) = &args.table {
        let mut gpus: Vec<String> = Vec::new();
        for d in runs.iter().filter_map(|r| r.device.clone()) {
            if !gpus.contains(&d) {
                gpus.push(d);
            }
        }
        let table = perf_table::Table {
            gpus,
            kiln_setup: setup_note(args, &opts),
            plans: runs.iter().map(|r| r.row.clone()).collect(),
            torch,
        };
        let text = perf_table::render(&table);
        println!();
        print!("{text}");
        // Read again: the file may have been edited while the plans were measured.
        let updated = perf_table::insert_table(&read_table_file(path)?, &text)
            .with_context(|| format!("--table {}", path.display()))?;
        perf_table::write_atomic(path, &updated)?;
        println!("\ntable written to {}", path.display());
    }
    let batches = |r: &PlanRun| r.row.failed.iter().map(|(b, _)| *b).collect::<Vec<_>>();
    if let [one] = runs.as_slice() {
        // One plan: the message scripts already know.
        if !one.row.failed.is_empty() {
            bail!("batch size(s) {:?} failed", batches(one));
        }
        return Ok(());
    }
    let failed: Vec<String> = runs
        .iter()
        .filter_map(|r| match (&r.error, r.row.failed.is_empty()) {
            (Some(_), _) => Some(format!("{} (not run)", r.path.display())),
            (None, true) => None,
            (None, false) => Some(format!("{} batch size(s) {:?}", r.path.display(), batches(r))),
        })
        .collect();
    if !failed.is_empty() {
        bail!("failed: {}", failed.join(", "));
    }
    Ok(())
}

/// The file `--table` writes into; one that does not exist yet is empty (it will be created).
fn read_table_file(path: &Path) -> anyhow::Result<String> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(text),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(String::new()),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

fn setup_note(args: &PerfArgs, opts: &EngineOptions) -> String {
    let batches: Vec<String> = args.batch.iter().map(usize::to_string).collect();
    format!(
        "kiln {}, {} stream(s), CUDA graph {}, tactics {}, batch sizes {}, {:.1} s warm-up + {:.1} s measured per batch \
         size",
        env!("CARGO_PKG_VERSION"),
        args.streams,
        if opts.cuda_graphs { "on" } else { "off" },
        if opts.tactics == TacticMode::Time { "time" } else { "heuristic" },
        batches.join(", "),
        args.warmup,
        args.duration
    )
}

/// Loads `path` (on the CPU first, for its precision and INT8 layers, then on the GPU) and
/// measures every batch size. Never fails: a plan that cannot run comes back with `error`.
fn run_plan(path: &Path, args: &PerfArgs, opts: &EngineOptions) -> PlanRun {
    let mut run = PlanRun {
        path: path.to_path_buf(),
        doc: Value::Null,
        row: PlanRow { model: model_name(path), ..PlanRow::default() },
        device: None,
        error: None,
    };
    run.row.plan_bytes = std::fs::metadata(path).ok().map(|m| m.len());
    let mut doc = json!({
        "tool": "kiln perf",
        "kiln_version": env!("CARGO_PKG_VERSION"),
        "plan": path.display().to_string(),
        "model": run.row.model,
        "plan_bytes": run.row.plan_bytes,
        "results": [],
    });
    if let Err(e) = measure_plan(path, args, opts, &mut run, &mut doc) {
        run.row.error = Some(format!("{e:#}"));
        if let Some(map) = doc.as_object_mut() {
            map.insert("error".into(), json!(format!("{e:#}")));
        }
        run.error = Some(e);
    }
    run.doc = doc;
    run
}

fn measure_plan(
    path: &Path,
    args: &PerfArgs,
    opts: &EngineOptions,
    run: &mut PlanRun,
    doc: &mut Value,
) -> anyhow::Result<()> {
    let cannot_load = || format!("cannot load {} on the CUDA engine", path.display());
    let loaded = Instant::now();
    let plan = kiln_engine::plan::load(path, &kiln_engine::plan::Expect::default()).with_context(cannot_load)?;
    let int8_layers = kiln_engine::quant::Int8Plan::from_graph(&plan.graph).nodes.len();
    run.row.precision = perf_table::precision_label(plan.settings.precision, int8_layers);
    if let Some(map) = doc.as_object_mut() {
        map.insert("precision".into(), json!(run.row.precision));
        map.insert("int8_layers".into(), json!(int8_layers));
    }
    let engine = Engine::load(plan, opts).with_context(cannot_load)?;
    let load_s = loaded.elapsed().as_secs_f64();
    run.device = Some(engine.device_name().to_owned());
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
        "kiln perf: {} ({}) on {} ({}), {streams} stream(s), CUDA graph {}, tactics {}, loaded in {load_s:.2} s",
        path.display(),
        run.row.precision,
        engine.device_name(),
        engine.arch(),
        if opts.cuda_graphs { "on" } else { "off" },
        if opts.tactics == TacticMode::Time { "time" } else { "heuristic" },
    );
    println!("  warm-up {:.1} s, {:.1} s measured per batch size{}", args.warmup, args.duration, seq_note(seq));
    print_header();

    let mut rows = Vec::new();
    for (i, &batch) in args.batch.iter().enumerate() {
        let outcome = make_inputs(engine.metadata(), batch, args.seq, 0x6b69_6c6e ^ i as u64)
            .and_then(|inputs| measure_batch(&mut contexts, &inputs, batch, args, show));
        match outcome {
            Ok(r) => {
                print_row(&r, seq);
                rows.push(r.to_json(seq));
                let compute_ms = r.stage_mean(|s| s.compute_ms);
                run.row.points.push(BatchPoint {
                    batch,
                    samples_per_s: r.samples_per_s(),
                    p50_ms: r.ms(0.50),
                    p99_ms: r.ms(0.99),
                    compute_samples_per_s: (compute_ms > 0.0).then(|| batch as f64 * 1e3 / compute_ms),
                });
            }
            Err(e) => {
                println!("{batch:>6}  failed: {e:#}");
                rows.push(json!({ "batch": batch, "seq": seq, "error": format!("{e:#}") }));
                run.row.failed.push((batch, format!("{e:#}")));
            }
        }
    }
    if let Err(e) = engine.save_timing_cache() {
        eprintln!("warning: timing cache not saved: {e}");
    }
    if let Some(map) = doc.as_object_mut() {
        let more = json!({
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
        if let Value::Object(more) = more {
            map.extend(more);
        }
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
}
