//! `kiln-train`: train, evaluate and export kiln's models.
//!
//! Data-parallel: `mpirun -n N kiln-train fit …` (each rank trains a replica on its slice
//! of every global batch; gradients are averaged through MPI or NCCL).

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use kiln_trainer::ddp::{Ddp, DdpOptions};
use kiln_trainer::models::{Arch, BertConfig, BertHead, ModelConfig};
use kiln_trainer::optim::AdamWConfig;
use kiln_trainer::package::{self, ExportOptions};
use kiln_trainer::train::{self, Built, DataConfig, DeviceChoice, FitConfig, FitOptions};
use kiln_trainer::{bench, checkpoint};

#[derive(Parser, Debug)]
#[command(name = "kiln-train", version, about = "Train, evaluate and export kiln's models (libtorch)")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Train a model (or continue one with --resume).
    Fit(Box<FitArgs>),
    /// Evaluate a checkpoint on its run's evaluation set.
    Eval(EvalArgs),
    /// Export a checkpoint to ONNX, with the config.toml and labels kiln serve needs.
    Export(ExportArgs),
    /// Time training steps on synthetic data (compare with benches/scripts/train_step.py).
    BenchStep(BenchArgs),
}

#[derive(Args, Debug)]
struct BenchArgs {
    #[arg(long, value_enum, default_value = "resnet18")]
    model: Arch,
    /// Global batch (split over mpirun ranks).
    #[arg(long, default_value_t = 64)]
    batch_size: i64,
    #[arg(long)]
    image_size: Option<i64>,
    #[arg(long, default_value_t = 1000)]
    num_classes: i64,
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    #[arg(long, default_value_t = 10)]
    steps: usize,
    #[arg(long, value_enum, default_value = "auto")]
    device: DeviceChoice,
    #[arg(long)]
    amp: bool,
    #[arg(long)]
    threads: Option<i32>,
    /// Also write the report here as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum DataKind {
    FashionMnist,
    ImageFolder,
    Text,
}

#[derive(Args, Debug)]
struct FitArgs {
    /// Run directory: checkpoints/, metrics.jsonl, curves.svg.
    #[arg(long)]
    out: PathBuf,
    /// Continue from a run or checkpoint directory (its configuration is kept).
    #[arg(long)]
    resume: Option<PathBuf>,
    #[arg(long, value_enum, default_value = "small-cnn")]
    model: Arch,
    #[arg(long, value_enum, default_value = "fashion-mnist")]
    data: DataKind,
    /// Fashion-MNIST/MNIST IDX directory.
    #[arg(long, default_value = "/usr/share/datasets/fashion-mnist")]
    data_dir: PathBuf,
    /// Training folder (image-folder) or file (text).
    #[arg(long)]
    train: Option<PathBuf>,
    /// Evaluation folder (image-folder) or file (text).
    #[arg(long)]
    eval: Option<PathBuf>,
    /// tokenizer.json for text data.
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    #[arg(long, default_value_t = 128)]
    max_len: usize,
    /// The text file's first row is a header.
    #[arg(long)]
    header: bool,
    /// HuggingFace config.json for --model bert.
    #[arg(long)]
    bert_config: Option<PathBuf>,
    /// Initial weights (safetensors with checkpoint names, e.g. a pretrained BERT).
    #[arg(long)]
    init_from: Option<PathBuf>,
    /// Image side for image models (default: 28 for the small CNN, 224 for ResNets).
    #[arg(long)]
    image_size: Option<i64>,
    #[arg(long)]
    dropout: Option<f64>,
    /// Small CNN without batch normalisation (conv biases instead).
    #[arg(long)]
    no_batch_norm: bool,
    /// Epochs (default 5; with --resume: extend the saved run to this many).
    #[arg(long)]
    epochs: Option<u64>,
    /// Global batch size (all ranks together).
    #[arg(long, default_value_t = 128)]
    batch_size: usize,
    #[arg(long, default_value_t = 512)]
    eval_batch_size: usize,
    #[arg(long, default_value_t = 2e-3)]
    lr: f64,
    #[arg(long, default_value_t = 1e-5)]
    min_lr: f64,
    #[arg(long, default_value_t = 100)]
    warmup_steps: u64,
    #[arg(long, default_value_t = 0.05)]
    weight_decay: f64,
    #[arg(long)]
    clip_grad_norm: Option<f64>,
    /// FP16 autocast with loss scaling (CUDA).
    #[arg(long)]
    amp: bool,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Data-loading threads per rank.
    #[arg(long, default_value_t = 2)]
    workers: usize,
    #[arg(long, value_enum, default_value = "auto")]
    device: DeviceChoice,
    /// Checkpoint every N steps too (always at the end of each epoch).
    #[arg(long)]
    checkpoint_every: Option<u64>,
    /// Stop after N optimizer steps in total.
    #[arg(long)]
    max_steps: Option<u64>,
    #[arg(long, default_value_t = 50)]
    log_every: u64,
    /// Micro-batches per step per rank (gradient accumulation).
    #[arg(long, default_value_t = 1)]
    grad_accum: u32,
    /// Keep only the first N training examples (Fashion-MNIST).
    #[arg(long)]
    train_limit: Option<usize>,
    /// Keep only the first N evaluation examples (Fashion-MNIST).
    #[arg(long)]
    eval_limit: Option<usize>,
    /// libtorch intra-op threads per rank (default: this host's cores / ranks on it).
    #[arg(long)]
    threads: Option<i32>,
    /// Gradient all-reduce bucket size in MiB.
    #[arg(long, default_value_t = 25)]
    bucket_mib: usize,
    #[arg(long)]
    no_progress: bool,
}

#[derive(Args, Debug)]
struct EvalArgs {
    /// A run or checkpoint directory.
    #[arg(long)]
    checkpoint: PathBuf,
    #[arg(long, default_value_t = 512)]
    batch_size: usize,
    #[arg(long, value_enum, default_value = "auto")]
    device: DeviceChoice,
    #[arg(long, default_value_t = 2)]
    workers: usize,
}

#[derive(Args, Debug)]
struct ExportArgs {
    /// A run or checkpoint directory.
    #[arg(long)]
    checkpoint: PathBuf,
    /// Usually models/<name>/<version>/model.onnx, so config.toml and labels.txt land in models/<name>/.
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value_t = kiln_onnx::DEFAULT_OPSET)]
    opset: i64,
    /// Replace an existing config.toml and labels.txt.
    #[arg(long)]
    force: bool,
    #[arg(long, default_value_t = 64)]
    max_batch_size: usize,
    /// ONNX Runtime library for the parity check.
    #[arg(long, env = "KILN_ORT_LIBRARY")]
    ort_library: Option<PathBuf>,
    /// Skip the ONNX Runtime parity check.
    #[arg(long)]
    no_verify: bool,
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let (trains, amp) = match &cli.command {
        Command::Fit(a) => (true, a.amp),
        Command::BenchStep(a) => (true, a.amp),
        _ => (false, false),
    };
    if trains {
        reexec_with_process_settings(amp);
    }
    if let Err(e) = run(cli) {
        eprintln!("kiln-train: {e:#}");
        std::process::exit(1);
    }
}

/// Settings that only take effect when the process starts, applied by re-executing it
/// once (same PID, so mpirun is unaffected). Variables the user set are left alone.
///
/// - glibc returns every large freed block to the kernel, so each training step maps
///   and zero-faults its activations again: on a 2-core VM, ResNet-18 at batch 64 took
///   5.0 M page faults and 11 s of system time for 4 steps. Keeping freed memory in the
///   heap (raised mmap and trim thresholds) cut that to 1.1 M faults and 2.4 s, and the
///   step from 5.65 s to 4.65 s; the price is that the process keeps its peak memory,
///   as PyTorch's CUDA caching allocator does on a GPU.
/// - tch's `autocast` calls libtorch's deprecated autocast switches, and libtorch warns
///   on every call (six lines per step); libtorch reads its log level only at load.
fn reexec_with_process_settings(amp: bool) {
    use std::os::unix::process::CommandExt;
    const MARK: &str = "KILN_TRAIN_REEXEC";
    if std::env::var_os(MARK).is_some() {
        return;
    }
    let mut wanted: Vec<(&str, &str)> =
        vec![("MALLOC_MMAP_THRESHOLD_", "4294967296"), ("MALLOC_TRIM_THRESHOLD_", "4294967296")];
    if amp {
        wanted.push(("TORCH_CPP_LOG_LEVEL", "ERROR"));
    }
    wanted.retain(|(k, _)| std::env::var_os(k).is_none());
    if wanted.is_empty() {
        return;
    }
    let Ok(exe) = std::env::current_exe() else { return };
    let err = std::process::Command::new(exe).args(std::env::args_os().skip(1)).envs(wanted).env(MARK, "1").exec();
    tracing::warn!("could not re-execute with the process settings: {err}");
}

fn run(cli: Cli) -> Result<()> {
    let bucket_mib = match &cli.command {
        Command::Fit(a) => a.bucket_mib.max(1),
        _ => 25,
    };
    if let Command::Export(args) = cli.command {
        return export(args);
    }
    let ddp = Ddp::init(DdpOptions { bucket_bytes: bucket_mib << 20 }).context("starting data-parallel")?;
    let result = match cli.command {
        Command::Fit(args) => fit(*args, &ddp),
        Command::Eval(args) => eval(args, &ddp),
        Command::BenchStep(args) => bench_step(args, &ddp),
        Command::Export(_) => Ok(()),
    };
    match result {
        // Under mpirun the other ranks would wait forever in their next collective.
        Err(e) if ddp.world().size > 1 => {
            eprintln!("kiln-train: rank {}: {e:#}", ddp.world().rank);
            ddp.abort(1)
        }
        other => other,
    }
}

fn fit(a: FitArgs, ddp: &Ddp) -> Result<()> {
    let world = ddp.world();
    set_threads(a.threads, world.size);
    let model = model_config(&a)?;
    let data = match a.data {
        DataKind::FashionMnist => {
            DataConfig::FashionMnist { dir: a.data_dir.clone(), train_limit: a.train_limit, eval_limit: a.eval_limit }
        }
        DataKind::ImageFolder => {
            DataConfig::ImageFolder { train: need(&a.train, "--train")?, eval: need(&a.eval, "--eval")? }
        }
        DataKind::Text => DataConfig::Text {
            train: need(&a.train, "--train")?,
            eval: need(&a.eval, "--eval")?,
            tokenizer: need(&a.tokenizer, "--tokenizer")?,
            max_len: a.max_len,
            has_header: a.header,
        },
    };
    let config = FitConfig {
        model,
        data,
        epochs: a.epochs.unwrap_or(5),
        batch_size: a.batch_size,
        eval_batch_size: a.eval_batch_size,
        lr: a.lr,
        min_lr: a.min_lr,
        warmup_steps: a.warmup_steps,
        adamw: AdamWConfig { weight_decay: a.weight_decay, ..AdamWConfig::default() },
        clip_grad_norm: a.clip_grad_norm,
        amp: a.amp,
        seed: a.seed,
        workers: a.workers.max(1),
        device: a.device,
        checkpoint_every: a.checkpoint_every,
        max_steps: a.max_steps,
        init_from: a.init_from.clone(),
        log_every: a.log_every,
        grad_accum: a.grad_accum,
    };
    let options = FitOptions {
        run_dir: a.out.clone(),
        resume: a.resume.clone(),
        extend_epochs: a.epochs,
        progress: !a.no_progress && ddp.is_root(),
    };
    let report = train::fit(config, &options, ddp)?;
    if ddp.is_root() {
        let last = report.history.last();
        // serde_json writes a metric that is missing or not finite as null, never NaN.
        let summary = serde_json::json!({
            "steps": report.steps,
            "epochs": report.history.len(),
            "eval_accuracy": last.map(|m| m.eval_accuracy),
            "eval_loss": last.map(|m| m.eval_loss),
            "checkpoint": report.last_checkpoint.as_ref().map(|p| p.display().to_string()),
            "world_size": world.size,
            "replica_fingerprints": report.replica_fingerprints,
        });
        println!("{summary}");
    }
    Ok(())
}

fn model_config(a: &FitArgs) -> Result<ModelConfig> {
    // 0 classes: taken from the data once it is open.
    let mut m = match a.model {
        Arch::SmallCnn => ModelConfig::small_cnn(0),
        Arch::Resnet18 => ModelConfig::resnet18(0),
        Arch::Resnet50 => ModelConfig::resnet50(0),
        Arch::Bert => {
            let path = need(&a.bert_config, "--bert-config")?;
            let mut bert = BertConfig::from_hf_json(&path)?;
            bert.head = BertHead::Classifier { num_labels: 0 };
            ModelConfig::bert(bert)
        }
    };
    if let Some(size) = a.image_size {
        m.image_size = size;
    }
    if let Some(p) = a.dropout {
        m.dropout = p;
    }
    if a.no_batch_norm {
        m.batch_norm = false;
    }
    if a.data == DataKind::ImageFolder {
        m.in_channels = 3;
    }
    Ok(m)
}

fn need(v: &Option<PathBuf>, flag: &str) -> Result<PathBuf> {
    match v {
        Some(p) => Ok(p.clone()),
        None => bail!("{flag} is required for this data kind"),
    }
}

/// Ranks on one host share its cores; oversubscribed libtorch threads slow everyone.
fn set_threads(explicit: Option<i32>, world: usize) {
    let local_ranks: usize =
        std::env::var("OMPI_COMM_WORLD_LOCAL_SIZE").ok().and_then(|v| v.parse().ok()).unwrap_or(world);
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let threads = explicit.unwrap_or(((cores / local_ranks.max(1)).max(1)) as i32);
    tch::set_num_threads(threads.max(1));
}

fn eval(a: EvalArgs, ddp: &Ddp) -> Result<()> {
    set_threads(None, ddp.world().size);
    let dir = checkpoint::resolve(&a.checkpoint)?;
    let meta = checkpoint::load_meta(&dir)?;
    let device = train::resolve_device(a.device, train::local_rank())?;
    let mut built = Built::new(&meta.config.model, device)?;
    checkpoint::load_weights(&dir, &mut built.vs)?;
    let (_, eval_set) = train::datasets(&meta.config.data, &meta.config.model)?;
    let m = train::evaluate(&built, &Arc::clone(&eval_set), a.batch_size, ddp, a.workers.max(1), false)?;
    if ddp.is_root() {
        let summary = serde_json::json!({
            "checkpoint": dir.display().to_string(),
            "step": meta.step,
            "examples": m.examples,
            "loss": m.loss,
            "accuracy": m.accuracy,
        });
        println!("{summary}");
    }
    Ok(())
}

fn export(a: ExportArgs) -> Result<()> {
    let ort_library = if a.no_verify { None } else { a.ort_library.clone() };
    if ort_library.is_none() && !a.no_verify {
        bail!("the parity check needs ONNX Runtime: pass --ort-library (or KILN_ORT_LIBRARY), or --no-verify");
    }
    let options = ExportOptions { opset: a.opset, force: a.force, ort_library, max_batch_size: a.max_batch_size };
    let report = package::export(&a.checkpoint, &a.out, &options)?;
    let summary = serde_json::json!({
        "onnx": report.onnx.display().to_string(),
        "config": report.config.as_ref().map(|p| p.display().to_string()),
        "max_abs_diff": report.max_abs_diff,
    });
    println!("{summary}");
    Ok(())
}

fn bench_step(a: BenchArgs, ddp: &Ddp) -> Result<()> {
    set_threads(a.threads, ddp.world().size);
    let mut model = match a.model {
        Arch::SmallCnn => ModelConfig::small_cnn(a.num_classes),
        Arch::Resnet18 => ModelConfig::resnet18(a.num_classes),
        Arch::Resnet50 => ModelConfig::resnet50(a.num_classes),
        Arch::Bert => bail!("bench-step measures image models"),
    };
    if let Some(s) = a.image_size {
        model.image_size = s;
    }
    let device = train::resolve_device(a.device, train::local_rank())?;
    let spec =
        bench::StepBench { model, batch_size: a.batch_size, warmup: a.warmup, steps: a.steps, device, amp: a.amp };
    let report = bench::run(&spec, ddp)?;
    if ddp.is_root() {
        println!(
            "{:<20} {:<9} batch {:>4} {:>4}px {:<8} threads {:>2} ranks {} | median {:>9.2} ms  mean {:>9.2} ms  {:>9.1} img/s",
            report.implementation,
            report.model,
            report.batch_size,
            report.image_size,
            report.device,
            report.threads,
            report.world_size,
            report.median_ms,
            report.mean_ms,
            report.images_per_second
        );
        if let Some(path) = &a.json {
            std::fs::write(path, serde_json::to_vec_pretty(&report)?).with_context(|| format!("{}", path.display()))?;
        }
    }
    Ok(())
}
