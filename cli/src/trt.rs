//! `kiln build --backend tensorrt`: builds the TensorRT engines of a model ahead of serving,
//! into the same keyed cache directory `kiln serve` (with `backend = "tensorrt"`) will look
//! in, so no first request waits minutes for an engine build.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use kiln_engine::builder::human_bytes;
use kiln_engine::providers::{AxisRange, CudaOptions, Provider, TensorRtOptions, TrtPrecision, probe};
use kiln_engine::{Backend, OrtBackend, OrtOptions, OrtRuntime, Tensor};
use kiln_server::ModelConfig;

use crate::build::{BuildArgs, PrecisionArg, parse_profile};

/// The model config the server will use: `--config`, or the repository layout's
/// `<model>/config.toml` above `<model>/<version>/model.onnx`.
pub(crate) fn model_config(args: &BuildArgs) -> anyhow::Result<Option<(ModelConfig, PathBuf)>> {
    let path = match &args.config {
        Some(p) => p.clone(),
        None => {
            // Canonical first: `model.onnx` given from inside the version directory has no parent.
            let model = std::fs::canonicalize(&args.model).unwrap_or_else(|_| args.model.clone());
            match model.parent().and_then(Path::parent) {
                Some(dir) if dir.join("config.toml").is_file() => dir.join("config.toml"),
                _ => return Ok(None),
            }
        }
    };
    let config = ModelConfig::load(&path)?;
    let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
    Ok(Some((config, dir)))
}

fn range(symbol: &str, text: &str) -> anyhow::Result<AxisRange> {
    let p = parse_profile(symbol, text)?;
    Ok([p.min, p.opt, p.max])
}

/// The TensorRT options (with the CUDA provider's behind them) and the largest batch: the
/// model config's, overridden by flags.
fn options(args: &BuildArgs) -> anyhow::Result<(TensorRtOptions, CudaOptions, usize)> {
    let (mut trt, cuda, max_batch) = match model_config(args)? {
        Some((config, dir)) => {
            println!("model config: {}", dir.join("config.toml").display());
            (config.tensorrt_options(&dir), config.ort_cuda.clone(), config.max_batch_size)
        }
        None => {
            println!(
                "no model config found (give --config): defaults are used, and `kiln serve` finds these \
                 engines only if its [tensorrt] table and max_batch_size (64) give the same cache key"
            );
            (TensorRtOptions::default(), CudaOptions::default(), 64)
        }
    };
    let overridden: Vec<&str> = [
        ("--precision", args.precision.is_some()),
        ("--batch", args.batch.is_some()),
        ("--seq", args.seq.is_some()),
        ("--engine-cache", args.engine_cache.is_some()),
        ("--calibration-table", args.calibration_table.is_some()),
        ("--workspace-mib", args.workspace_mib.is_some()),
    ]
    .into_iter()
    .filter_map(|(flag, set)| set.then_some(flag))
    .collect();
    if !overridden.is_empty() {
        println!(
            "note: {} override the config; the server uses these engines only if its config says the same",
            overridden.join(", ")
        );
    }
    if let Some(p) = args.precision {
        trt.precision = match p {
            PrecisionArg::Fp32 => TrtPrecision::Fp32,
            PrecisionArg::Fp16 => TrtPrecision::Fp16,
            PrecisionArg::Int8 => TrtPrecision::Int8,
        };
    }
    if let Some(b) = &args.batch {
        trt.batch = Some(range("batch", b)?);
    }
    if let Some(s) = &args.seq {
        trt.seq = Some(range("seq", s)?);
    }
    let overrides =
        [(&args.engine_cache, &mut trt.engine_cache_dir), (&args.calibration_table, &mut trt.int8_calibration_table)];
    for (flag, field) in overrides {
        if let Some(p) = flag {
            *field = Some(p.clone());
        }
    }
    trt.workspace_mib = args.workspace_mib.or(trt.workspace_mib);
    trt.device_id = args.device.unwrap_or(trt.device_id);
    if let Err(e) = trt.validate() {
        bail!("{e}");
    }
    Ok((trt, cuda, max_batch))
}

fn spinner(msg: &str) -> ProgressBar {
    let bar = crate::build::bar(0);
    if let Ok(style) = ProgressStyle::with_template("{spinner} {msg} ({elapsed})") {
        bar.set_style(style);
    }
    bar.set_message(msg.to_string());
    bar.enable_steady_tick(Duration::from_millis(120));
    bar
}

/// Zero inputs with every dynamic axis set: axis 0 to `batch`, the others to `seq`.
fn zero_inputs(backend: &dyn Backend, batch: usize, seq: usize) -> anyhow::Result<Vec<Tensor>> {
    let inputs =
        backend.metadata().inputs.iter().map(|spec| Tensor::zeros(spec.dtype, spec.concrete_shape(batch, seq)));
    Ok(inputs.collect::<Result<Vec<_>, _>>()?)
}

pub fn warm(args: &BuildArgs) -> anyhow::Result<()> {
    let kiln_only = [
        ("--verify", args.verify),
        ("--out", args.out.is_some()),
        ("--report", args.report.is_some()),
        ("--uint8-mean/--uint8-std", args.uint8_mean.is_some()),
        ("--timing-cache", args.timing_cache.is_some()),
        ("--calib", args.calib.is_some()),
        ("--calib-cache", args.calib_cache.is_some()),
        ("--accuracy-data", args.accuracy_data.is_some()),
        ("--export-qdq", args.export_qdq.is_some()),
    ];
    if let Some((flag, _)) = kiln_only.iter().find(|(_, set)| *set) {
        bail!("{flag} applies to kiln plans, not to --backend tensorrt");
    }
    let (trt, cuda, max_batch) = options(args)?;
    let runtime = OrtRuntime::load(&args.ort_library).context("--backend tensorrt needs ONNX Runtime")?;
    let [b_min, b_opt, b_max] = trt.batch.unwrap_or([1, max_batch, max_batch]);
    let [s_min, s_opt, s_max] = trt.seq.unwrap_or([1, 128, 512]);
    let precision = trt.precision.name();
    let provider = Provider::TensorRt(Box::new(trt), cuda);
    let opts = OrtOptions { intra_threads: 0, provider, max_batch };
    let progress = spinner(&format!("building {precision} TensorRT engines for {}", args.model.display()));
    let started = Instant::now();
    let mut backend = match OrtBackend::load(&runtime, &args.model, &opts) {
        Ok(b) => b,
        Err(e) => {
            progress.finish_and_clear();
            return Err(e).context("kiln build --backend tensorrt");
        }
    };
    // TensorRT builds lazily per input shape range; one run at each profile corner makes
    // sure every engine exists and is serialised into the cache.
    for (batch, seq) in [(b_min, s_min), (b_opt, s_opt), (b_max, s_max)] {
        progress.set_message(format!("running batch {batch} (sequence {seq}) through TensorRT"));
        let inputs = zero_inputs(&backend, batch, seq)?;
        backend.run(&inputs).with_context(|| format!("running batch {batch} through TensorRT"))?;
    }
    progress.finish_and_clear();
    let cache = backend.engine_cache_dir().context("the TensorRT session reported no engine cache")?;
    println!("TensorRT engines ({precision}) built in {:.1} s", started.elapsed().as_secs_f64());
    println!("engine cache: {}", cache.display());
    let mut files: Vec<(String, u64)> = std::fs::read_dir(cache)
        .with_context(|| format!("listing {}", cache.display()))?
        .filter_map(Result::ok)
        .filter_map(|e| Some((e.file_name().to_string_lossy().into_owned(), e.metadata().ok()?.len())))
        .collect();
    files.sort();
    for (name, len) in files {
        println!("  {name} ({})", human_bytes(usize::try_from(len).unwrap_or(usize::MAX)));
    }
    Ok(())
}

#[derive(Args, Debug)]
pub struct ProvidersArgs {
    /// Path of the ONNX Runtime shared library to check (the GPU build for TensorRT / CUDA).
    #[arg(long, env = "KILN_ORT_LIBRARY", default_value = ".kiln/lib/libonnxruntime.so")]
    ort_library: PathBuf,
    /// The GPU to report on.
    #[arg(long, default_value_t = 0)]
    device: u32,
}

/// `kiln providers`: what each backend needs on this machine, as one report.
pub fn providers(args: &ProvidersArgs) -> anyhow::Result<()> {
    let runtime = OrtRuntime::load(&args.ort_library)?;
    println!("ONNX Runtime: {} — {}", args.ort_library.display(), probe::onnxruntime_version(runtime.library()));
    match probe::gpu_identity(args.device) {
        Ok(gpu) => println!("GPU {}: {gpu}", args.device),
        Err(e) => println!("GPU {}: none ({e})", args.device),
    }
    println!("TensorRT: {}", probe::tensorrt_version().unwrap_or_else(|| "libnvinfer.so.10 not found".into()));
    let trt = TensorRtOptions { device_id: args.device, ..TensorRtOptions::default() };
    let cuda = CudaOptions { device_id: args.device, ..CudaOptions::default() };
    for provider in [Provider::TensorRt(Box::new(trt), cuda.clone()), Provider::Cuda(cuda), Provider::Cpu] {
        let state = match runtime.check_provider(&provider) {
            Ok(()) => "ready".to_string(),
            Err(kiln_engine::EngineError::ProviderUnavailable { detail, .. }) => format!("unavailable: {detail}"),
            Err(e) => format!("unavailable: {e}"),
        };
        println!("{:<9} ({}): {state}", provider.config_name(), provider.ort_name());
    }
    Ok(())
}
