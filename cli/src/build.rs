//! `kiln build` (trtexec-like: ONNX → optimised plan, report, optional
//! verification against ONNX Runtime) and `kiln inspect`.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use kiln_engine::builder::{BuildOptions, Layout, human_bytes, precision_name};
use kiln_engine::graph::{Graph, Precision, shape_string};
use kiln_engine::plan::{self, Expect, Profile};
use kiln_engine::reference::RunOptions;
use kiln_engine::verify::{OutputError, sample_inputs, verify};
use kiln_engine::{OrtRuntime, import};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PrecisionArg {
    Fp32,
    Fp16,
    /// TensorRT only (a calibration table, or a model with Q/DQ nodes).
    Int8,
}

/// What `kiln build` builds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BuildBackend {
    /// A kiln plan for kiln's CUDA engine (and the reference executor).
    Kiln,
    /// TensorRT engines in ONNX Runtime's TensorRT provider cache, exactly where
    /// `kiln serve` with `backend = "tensorrt"` will look for them.
    Tensorrt,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LayoutArg {
    Auto,
    Nchw,
    Nhwc,
}

#[derive(Args, Debug)]
pub struct BuildArgs {
    /// The ONNX model to build.
    pub(crate) model: PathBuf,
    /// What to build: a kiln plan, or TensorRT engines (warming the cache `kiln serve` uses).
    #[arg(long, value_enum, default_value = "kiln")]
    pub(crate) backend: BuildBackend,
    /// Precision (default fp32 for kiln plans, where FP16 keeps an allow-list of sensitive
    /// ops in FP32; for TensorRT the model config's, else fp16).
    #[arg(long, value_enum)]
    pub(crate) precision: Option<PrecisionArg>,
    /// Batch profile MIN:OPT:MAX (default 1:8:64; for TensorRT the model config's
    /// [tensorrt] batch, else 1:max_batch_size:max_batch_size).
    #[arg(long)]
    pub(crate) batch: Option<String>,
    /// Sequence profile MIN:OPT:MAX, for models with a dynamic sequence dimension
    /// (default 1:128:512, or the config's [tensorrt] seq).
    #[arg(long)]
    pub(crate) seq: Option<String>,
    /// TensorRT: the model's config.toml, whose [tensorrt] table and max_batch_size the
    /// server will use (default: `../config.toml` of a repository's `<model>/<version>/model.onnx`).
    #[arg(long)]
    pub(crate) config: Option<PathBuf>,
    /// TensorRT: engine cache directory (default: the config's, else `trt_cache` beside the model).
    #[arg(long)]
    pub(crate) engine_cache: Option<PathBuf>,
    /// TensorRT: INT8 calibration table, for models without Q/DQ nodes.
    #[arg(long)]
    pub(crate) calibration_table: Option<PathBuf>,
    /// TensorRT: builder workspace in MiB.
    #[arg(long)]
    pub(crate) workspace_mib: Option<u64>,
    /// TensorRT: the GPU to build for.
    #[arg(long)]
    pub(crate) device: Option<u32>,
    /// INT8 (kiln plans): calibration data, preprocessed as the model config's [input]
    /// says: a folder of images, or an IDX images file (`*-images-idx3-ubyte[.gz]`).
    #[arg(long)]
    pub(crate) calib: Option<PathBuf>,
    /// INT8: how activation ranges are chosen: percentile (99.99, the default), percentile:P,
    /// minmax, or entropy (TensorRT's KL method).
    #[arg(long, default_value = "percentile")]
    pub(crate) calib_method: String,
    /// INT8: calibration samples used at most.
    #[arg(long, default_value_t = 500)]
    pub(crate) calib_limit: usize,
    /// INT8: calibration cache (activation histograms): read when it exists, else written.
    #[arg(long)]
    pub(crate) calib_cache: Option<PathBuf>,
    /// INT8: labelled data for the accuracy gate (images in `<class>/` folders named by
    /// label or class index, or an IDX images file with its labels file beside it).
    #[arg(long)]
    pub(crate) accuracy_data: Option<PathBuf>,
    /// INT8: labelled samples used at most.
    #[arg(long, default_value_t = 10_000)]
    pub(crate) accuracy_limit: usize,
    /// INT8: largest accepted loss of top-1 accuracy against FP32, in points; the most
    /// sensitive layers stay FP16 until INT8 is within it.
    #[arg(long, default_value_t = 0.5)]
    pub(crate) max_drop: f64,
    /// INT8: also write the model with kiln's calibration as QuantizeLinear/DequantizeLinear
    /// pairs (per-channel INT8 weights), for ONNX Runtime or TensorRT.
    #[arg(long)]
    pub(crate) export_qdq: Option<PathBuf>,
    /// Activation layout of convolution regions (auto: NHWC for FP16).
    #[arg(long, value_enum, default_value = "auto")]
    layout: LayoutArg,
    /// Target recorded in the plan; loading refuses a plan built for another.
    #[arg(long, default_value = "cpu-reference")]
    arch: String,
    /// Where to write the plan (default: the model's path with `.plan`).
    #[arg(long)]
    pub(crate) out: Option<PathBuf>,
    /// Also write the build report as JSON here.
    #[arg(long)]
    pub(crate) report: Option<PathBuf>,
    /// Run the optimised graph on the reference executor and the ONNX file on ONNX
    /// Runtime with the same inputs; fail when an output's relative error exceeds --tolerance.
    #[arg(long)]
    pub(crate) verify: bool,
    /// Batch size of the verification inputs.
    #[arg(long, default_value_t = 2)]
    verify_batch: usize,
    /// Sequence length of the verification inputs.
    #[arg(long, default_value_t = 16)]
    verify_seq: usize,
    /// Largest accepted max-abs error over the largest reference magnitude
    /// (default 1e-4 for FP32, 2e-2 for FP16).
    #[arg(long)]
    tolerance: Option<f64>,
    /// Path of the ONNX Runtime shared library used by --verify and --backend tensorrt.
    #[arg(long, env = "KILN_ORT_LIBRARY", default_value = ".kiln/lib/libonnxruntime.so")]
    pub(crate) ort_library: PathBuf,
    /// Give the plan a UINT8 NHWC image input normalised on the device as
    /// `(pixel − mean) / std`, e.g. `--uint8-mean 127,127,127 --uint8-std 128,128,128`
    /// (replaces the model's FP32 image input; needs --uint8-std too).
    #[arg(long, value_delimiter = ',', requires = "uint8_std")]
    pub(crate) uint8_mean: Option<Vec<f32>>,
    /// Per-channel std of --uint8-mean.
    #[arg(long, value_delimiter = ',', requires = "uint8_mean")]
    uint8_std: Option<Vec<f32>>,
    /// Timing cache file for GPU tactic selection, read and updated (reused across builds).
    #[arg(long, env = "KILN_TIMING_CACHE")]
    pub(crate) timing_cache: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct InspectArgs {
    /// An ONNX model or a kiln plan.
    path: PathBuf,
    /// List every node with its output shapes.
    #[arg(long)]
    nodes: bool,
}

/// `MIN:OPT:MAX` (or a single `N` for a fixed size).
pub fn parse_profile(symbol: &str, text: &str) -> anyhow::Result<Profile> {
    let parts: Vec<&str> = text.split(':').collect();
    let nums = parts
        .iter()
        .map(|p| p.trim().parse::<usize>())
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("--{symbol} {text:?}: expected MIN:OPT:MAX"))?;
    let (min, opt, max) = match nums.as_slice() {
        [n] => (*n, *n, *n),
        [a, b, c] => (*a, *b, *c),
        _ => bail!("--{symbol} {text:?}: expected MIN:OPT:MAX"),
    };
    if !(1 <= min && min <= opt && opt <= max) {
        bail!("--{symbol} {text:?}: need 1 ≤ MIN ≤ OPT ≤ MAX");
    }
    Ok(Profile { symbol: symbol.to_string(), min, opt, max })
}

fn symbols(graph: &Graph) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for &i in &graph.inputs {
        for d in graph.shape(i).into_iter().flatten() {
            for s in d.symbols() {
                if !out.contains(s) {
                    out.push(s.clone());
                }
            }
        }
    }
    out
}

pub(crate) fn bar(len: u64) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len);
    let style = ProgressStyle::with_template("{spinner} [{bar:30}] {pos}/{len} {msg}")
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
    bar.set_style(style);
    bar.enable_steady_tick(Duration::from_millis(120));
    bar
}

pub fn build(args: &BuildArgs) -> anyhow::Result<()> {
    if args.backend == BuildBackend::Tensorrt {
        return crate::trt::warm(args);
    }
    let graph = import::import_file(&args.model).with_context(|| format!("cannot import {}", args.model.display()))?;
    let mut profiles = Vec::new();
    for s in symbols(&graph) {
        profiles.push(match s.as_str() {
            import::BATCH => parse_profile(import::BATCH, args.batch.as_deref().unwrap_or("1:8:64"))?,
            import::SEQ => parse_profile(import::SEQ, args.seq.as_deref().unwrap_or("1:128:512"))?,
            other => bail!("input dimension {other} is dynamic; kiln builds profiles for batch and seq only"),
        });
    }
    let int8 = args.precision == Some(PrecisionArg::Int8);
    check_int8_flags(args, int8)?;
    // INT8 plans keep their other layers (and the gate's sensitive ones) in FP16.
    let precision = match args.precision.unwrap_or(PrecisionArg::Fp32) {
        PrecisionArg::Fp32 => Precision::F32,
        PrecisionArg::Fp16 | PrecisionArg::Int8 => Precision::F16,
    };
    let opts = BuildOptions {
        precision,
        layout: match args.layout {
            LayoutArg::Auto => Layout::Auto,
            LayoutArg::Nchw => Layout::Nchw,
            LayoutArg::Nhwc => Layout::Nhwc,
        },
        profiles,
        arch: args.arch.clone(),
        source: args.model.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
        uint8_input: match (&args.uint8_mean, &args.uint8_std) {
            (Some(m), Some(s)) => {
                let three = |v: &[f32]| -> anyhow::Result<[f32; 3]> {
                    v.try_into().map_err(|_| anyhow::anyhow!("--uint8-mean/--uint8-std take three values each"))
                };
                Some(kiln_engine::image_input::Uint8Input::from_mean_std(three(m)?, three(s)?)?)
            }
            _ => None,
        },
    };
    let progress = bar(0);
    let (plan, report) = kiln_engine::builder::build(graph, &opts, |pass, done, total| {
        progress.set_length(total as u64 + 1);
        progress.set_position(done as u64);
        progress.set_message(pass.to_string());
    })?;
    let (plan, int8_summary) = if int8 { quantise(plan, args, &progress)? } else { (plan, None) };
    // After quantisation: INT8 layers have their own GEMM and convolution tactics.
    let plan = if precision == Precision::F16 { fill_tactics(plan, args, &progress)? } else { plan };
    progress.set_message("writing plan");
    let out = args.out.clone().unwrap_or_else(|| args.model.with_extension("plan"));
    plan::save(&plan, &out).with_context(|| format!("cannot write {}", out.display()))?;
    progress.finish_and_clear();
    println!("{report}");
    if let Some(summary) = &int8_summary {
        println!("{summary}");
    }
    let size = std::fs::metadata(&out).map(|m| m.len() as usize).unwrap_or(0);
    println!("plan: {} ({})", out.display(), human_bytes(size));
    if let Some(path) = &args.report {
        let mut json = serde_json::to_value(&report)?;
        if let (Some(summary), Some(map)) = (&int8_summary, json.as_object_mut()) {
            map.insert("int8".into(), serde_json::to_value(summary)?);
        }
        write_json(path, &json)?;
    }
    if args.verify {
        run_verify(args, &plan.graph, precision)?;
    }
    Ok(())
}

/// On a GPU machine, times the CUDA engine's tactics at the batch profile's opt
/// and max (sequence at its opt) and records them in the plan, which is then
/// tied to this GPU's arch; elsewhere the plan is written as is and the engine
/// times its tactics at first load.
fn fill_tactics(mut plan: plan::Plan, args: &BuildArgs, progress: &ProgressBar) -> anyhow::Result<plan::Plan> {
    use kiln_cuda::engine::{Engine, EngineOptions};
    if let Err(e) = kiln_cuda::device::available() {
        progress.suspend(|| println!("tactics: not chosen here ({e}); the CUDA engine times them at first load"));
        return Ok(plan);
    }
    progress.set_message("timing tactics on the GPU");
    let started = std::time::Instant::now();
    let opts =
        EngineOptions { timing_cache: args.timing_cache.clone(), cuda_graphs: false, ..EngineOptions::default() };
    let engine = Engine::load(plan.clone(), &opts)?;
    let mut ctx = engine.context()?;
    let mut bindings: Vec<HashMap<String, usize>> = Vec::new();
    let batch = plan.settings.profiles.iter().find(|p| p.symbol == "batch");
    for b in batch.map_or(vec![1], |p| vec![p.opt, p.max]) {
        let mut m: HashMap<String, usize> = plan.settings.profiles.iter().map(|p| (p.symbol.clone(), p.opt)).collect();
        m.insert("batch".into(), b);
        if !bindings.contains(&m) {
            bindings.push(m);
        }
    }
    let mut slots: HashMap<String, Vec<(String, String)>> = HashMap::new();
    for binding in &bindings {
        let inputs = engine.zero_inputs(binding)?;
        for r in ctx.prepare(&inputs)? {
            let slot = slots.entry(r.node).or_default();
            if !slot.iter().any(|(k, _)| *k == r.key) {
                slot.push((r.key, r.algo));
            }
        }
    }
    engine.save_timing_cache()?;
    let mut recorded = 0;
    for node in &mut plan.graph.nodes {
        if let Some(choices) = slots.get(&node.name) {
            node.kernel = kiln_cuda::tactics::kernel_slot(choices);
            recorded += choices.len();
        }
    }
    plan.settings.arch = engine.arch().to_owned();
    progress.suspend(|| {
        println!(
            "tactics: {recorded} chosen on {} ({}) in {:.1} s; the plan now targets {}",
            engine.device_name(),
            engine.arch(),
            started.elapsed().as_secs_f64(),
            plan.settings.arch
        )
    });
    Ok(plan)
}

/// INT8 options only with `--precision int8`, and not with what they cannot combine with.
pub(crate) fn check_int8_flags(args: &BuildArgs, int8: bool) -> anyhow::Result<()> {
    let given = [
        ("--calib", args.calib.is_some()),
        ("--calib-cache", args.calib_cache.is_some()),
        ("--accuracy-data", args.accuracy_data.is_some()),
        ("--export-qdq", args.export_qdq.is_some()),
    ];
    if !int8 {
        if let Some((flag, _)) = given.iter().find(|(_, set)| *set) {
            bail!("{flag} applies to --precision int8");
        }
        return Ok(());
    }
    if args.calib.is_none() && !args.calib_cache.as_ref().is_some_and(|p| p.is_file()) {
        bail!("--precision int8 needs calibration data: --calib DIR|IDX-FILE (or an existing --calib-cache)");
    }
    if args.verify {
        bail!(
            "--verify compares with FP32 ONNX Runtime; an INT8 plan is checked by the accuracy gate (--accuracy-data)"
        );
    }
    if args.uint8_mean.is_some() {
        bail!("--uint8-mean/--uint8-std cannot be combined with --precision int8 yet");
    }
    Ok(())
}

/// Calibrates the built plan and marks its INT8 layers (see `int8.rs`).
fn quantise(
    mut plan: plan::Plan,
    args: &BuildArgs,
    progress: &ProgressBar,
) -> anyhow::Result<(plan::Plan, Option<crate::int8::Int8Summary>)> {
    let (config, dir) = crate::trt::model_config(args)?
        .context("--precision int8 needs the model's config.toml (its [input] preprocessing): give --config")?;
    let data = crate::int8::ModelData::new(&config, &dir)?;
    let method = kiln_engine::quant::Method::parse(&args.calib_method).map_err(anyhow::Error::msg)?;
    let opts = crate::int8::Int8Options {
        calib: args.calib.as_deref().unwrap_or(Path::new("")),
        method,
        method_name: args.calib_method.clone(),
        calib_limit: args.calib_limit,
        cache: args.calib_cache.as_deref(),
        accuracy: args.accuracy_data.as_deref(),
        accuracy_limit: args.accuracy_limit,
        max_drop: args.max_drop,
    };
    let summary = crate::int8::quantise(&mut plan.graph, &data, &opts, progress)?;
    if let Some(out) = &args.export_qdq {
        let original = kiln_onnx::load(&args.model).with_context(|| format!("reading {}", args.model.display()))?;
        let int8 = kiln_engine::quant::Int8Plan::from_graph(&plan.graph);
        let (model, report) = kiln_engine::quant::export::qdq_model(&original, &int8)?;
        kiln_onnx::save(&model, out).with_context(|| format!("writing {}", out.display()))?;
        progress.suspend(|| {
            println!("Q/DQ model: {} ({} layers quantised)", out.display(), report.quantized.len());
            for (name, why) in &report.skipped {
                println!("  left in float: {name} ({why})");
            }
        });
    }
    Ok((plan, Some(summary)))
}

fn write_json(path: &Path, report: &impl serde::Serialize) -> anyhow::Result<()> {
    let json = serde_json::to_string_pretty(report)?;
    std::fs::write(path, json).with_context(|| format!("cannot write {}", path.display()))
}

fn run_verify(args: &BuildArgs, graph: &Graph, precision: Precision) -> anyhow::Result<()> {
    let runtime = OrtRuntime::load(&args.ort_library).context("--verify needs ONNX Runtime")?;
    let bindings: HashMap<String, usize> =
        [(import::BATCH.to_string(), args.verify_batch), (import::SEQ.to_string(), args.verify_seq)].into();
    let inputs = sample_inputs(graph, &bindings, 7)?;
    let opts = RunOptions { emulate_fp16: precision == Precision::F16 };
    let errors = verify(&runtime, &args.model, graph, &inputs, opts)?;
    let tolerance = args.tolerance.unwrap_or(if precision == Precision::F16 { 2e-2 } else { 1e-4 });
    print_errors(&errors, precision);
    // NaN-aware: f64::max would drop a NaN error and report success.
    let worst = errors
        .iter()
        .map(|e| e.max_rel)
        .fold(0.0, |a: f64, b| if a.is_nan() || b.is_nan() { f64::NAN } else { a.max(b) });
    if worst.is_nan() || worst > tolerance {
        bail!("verification failed: relative error {worst:.3e} exceeds {tolerance:.1e}");
    }
    println!("verified against ONNX Runtime: worst relative error {worst:.3e} ≤ {tolerance:.1e}");
    Ok(())
}

fn print_errors(errors: &[OutputError], precision: Precision) {
    println!("verify ({} reference vs ONNX Runtime FP32):", precision_name(precision));
    println!("  {:<24} {:<18} {:>11} {:>11} {:>10}", "output", "shape", "max abs", "max rel", "cosine");
    for e in errors {
        println!(
            "  {:<24} {:<18} {:>11.3e} {:>11.3e} {:>10.6}",
            e.name,
            format!("{:?}", e.shape),
            e.max_abs,
            e.max_rel,
            e.cosine
        );
    }
}

pub fn inspect(args: &InspectArgs) -> anyhow::Result<()> {
    let mut magic = [0u8; 8];
    let is_plan =
        std::fs::File::open(&args.path).and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic)).is_ok()
            && &magic == plan::MAGIC;
    let graph = if is_plan {
        let p = plan::load(&args.path, &Expect::default())
            .with_context(|| format!("cannot load {}", args.path.display()))?;
        let s = &p.settings;
        println!(
            "plan {} (kiln {}, arch {}, {})",
            args.path.display(),
            s.kiln_version,
            s.arch,
            precision_name(s.precision)
        );
        println!("  built from: {}", s.source);
        for pr in &s.profiles {
            println!("  profile {}: min {} opt {} max {}", pr.symbol, pr.min, pr.opt, pr.max);
        }
        p.graph
    } else {
        import::import_file(&args.path).with_context(|| format!("cannot import {}", args.path.display()))?
    };
    print_summary(&graph, args.nodes);
    Ok(())
}

fn print_summary(g: &Graph, nodes: bool) {
    let ty = |id: usize| {
        g.value_type(id)
            .map(|t| format!("{} {}", t.dtype, t.shape.as_deref().map(shape_string).unwrap_or_else(|| "[?]".into())))
            .unwrap_or_else(|| "?".into())
    };
    println!(
        "graph {} (opset {}): {} nodes, weights {}",
        g.name,
        g.opset,
        g.nodes.len(),
        human_bytes(g.weight_bytes())
    );
    for &i in &g.inputs {
        println!("  input  {}: {}", g.value(i).name, ty(i));
    }
    for &o in &g.outputs {
        println!("  output {}: {}", g.value(o).name, ty(o));
    }
    let ops: Vec<String> = g.op_histogram().iter().map(|(op, n)| format!("{op} ×{n}")).collect();
    println!("  ops: {}", ops.join(", "));
    let int8 = kiln_engine::quant::Int8Plan::from_graph(g).nodes.len();
    if int8 > 0 {
        println!("  INT8 layers: {int8}");
    }
    if nodes {
        for n in &g.nodes {
            let outs: Vec<String> = n.outputs.iter().map(|&o| ty(o)).collect();
            let int8 = n.attrs.get(kiln_engine::quant::INPUT_SCALE).is_some();
            let prec = match (int8, n.precision) {
                (true, _) => " int8",
                (false, Precision::F16) => " fp16",
                (false, Precision::F32) => "",
            };
            println!("  {:<40} {:<20} → {}{prec}", n.name, n.op, outs.join(", "));
        }
    }
}
