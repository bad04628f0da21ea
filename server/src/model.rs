//! A served model: its config, labels, preprocessing, and the batcher whose executors
//! own the backend instances.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use kiln_batcher::{Batcher, Executor, ExecutorError, Payload};
use kiln_engine::providers::Provider;
use kiln_engine::{Backend, Dim, ModelMetadata, OrtBackend, OrtOptions, OrtRuntime, Tensor};

use crate::ServerError;
use crate::classify::Classifier;
use crate::config::{BackendKind, ModelConfig};
use crate::metrics::Metrics;

/// One request's inputs, one tensor per model input, batch axis first.
#[derive(Debug)]
pub struct ModelInput(pub Vec<Tensor>);

impl Payload for ModelInput {
    fn items(&self) -> usize {
        self.0.first().map_or(0, Tensor::batch)
    }

    fn split(self, sizes: &[usize]) -> Result<Vec<Self>, ExecutorError> {
        let mut parts: Vec<ModelInput> = sizes.iter().map(|_| ModelInput(Vec::with_capacity(self.0.len()))).collect();
        for tensor in &self.0 {
            let pieces = tensor.split_batch(sizes).map_err(|e| ExecutorError(e.to_string()))?;
            for (part, piece) in parts.iter_mut().zip(pieces) {
                part.0.push(piece);
            }
        }
        Ok(parts)
    }
}

/// Drives one backend instance on its executor thread.
pub struct ModelExecutor {
    backend: Box<dyn Backend>,
}

impl std::fmt::Debug for ModelExecutor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelExecutor").field("backend", &self.backend.name()).finish()
    }
}

/// Same number of tensors, each with the same non-batch axes.
fn stackable(a: &ModelInput, b: &ModelInput) -> bool {
    a.0.len() == b.0.len() && a.0.iter().zip(&b.0).all(|(x, y)| x.shape().get(1..) == y.shape().get(1..))
}

impl ModelExecutor {
    fn run_stacked(&mut self, inputs: &[&ModelInput]) -> Result<Vec<Vec<Tensor>>, ExecutorError> {
        let err = |e: kiln_engine::EngineError| ExecutorError(e.to_string());
        let n_inputs = self.backend.metadata().inputs.len();
        // The one copy of each request's data: straight into the batch tensor.
        let batch = (0..n_inputs)
            .map(|i| {
                let parts: Vec<&Tensor> = inputs.iter().filter_map(|r| r.0.get(i)).collect();
                Tensor::concat_batch(&parts)
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(err)?;
        let outputs = self.backend.run(&batch).map_err(err)?;
        let sizes: Vec<usize> = inputs.iter().map(|r| r.items()).collect();
        let mut per_request: Vec<Vec<Tensor>> = sizes.iter().map(|_| Vec::with_capacity(outputs.len())).collect();
        for output in &outputs {
            for (slot, piece) in per_request.iter_mut().zip(output.split_batch(&sizes).map_err(err)?) {
                slot.push(piece);
            }
        }
        Ok(per_request)
    }
}

impl Executor for ModelExecutor {
    type Input = ModelInput;
    type Output = Vec<Tensor>;

    fn execute(&mut self, inputs: &[&ModelInput]) -> Result<Vec<Vec<Tensor>>, ExecutorError> {
        // Requests can only be stacked when every non-batch axis agrees (models with a
        // dynamic sequence axis); runs of compatible requests each make one engine call.
        let mut results = Vec::with_capacity(inputs.len());
        let mut start = 0;
        while let Some(first) = inputs.get(start) {
            let run = inputs[start..].iter().take_while(|r| stackable(first, r)).count();
            results.extend(self.run_stacked(&inputs[start..start + run])?);
            start += run;
        }
        Ok(results)
    }

    fn join(parts: Vec<Vec<Tensor>>) -> Result<Vec<Tensor>, ExecutorError> {
        let outputs = parts.first().map_or(0, Vec::len);
        (0..outputs)
            .map(|i| {
                let pieces: Vec<&Tensor> = parts.iter().filter_map(|p| p.get(i)).collect();
                Tensor::concat_batch(&pieces).map_err(|e| ExecutorError(e.to_string()))
            })
            .collect()
    }
}

#[derive(Debug)]
pub struct Model {
    pub name: String,
    pub version: u64,
    pub config: ModelConfig,
    pub metadata: ModelMetadata,
    /// Present when the config has `[input]`/`[output]`: `/predict` accepts images.
    pub classifier: Option<Classifier>,
    pub batcher: Batcher<ModelExecutor>,
    /// The backend that serves: the configured one, or the first fallback that loaded.
    pub serving: BackendKind,
    /// The engine behind it as its backend names itself (`onnxruntime-tensorrt`, …).
    pub engine: &'static str,
    pub precision: &'static str,
}

/// What each executor opens its own backend instance from.
#[derive(Debug, Clone)]
enum Source {
    Ort { runtime: OrtRuntime, model: PathBuf, options: OrtOptions },
    Cuda(Arc<kiln_cuda::engine::Engine>),
}

impl Source {
    /// Everything `kind` needs that is shared by the executors (the CUDA engine's weights).
    fn new(
        kind: BackendKind,
        dir: &Path,
        version: u64,
        config: &ModelConfig,
        runtime: &OrtRuntime,
    ) -> Result<Self, ServerError> {
        let model = dir.join(version.to_string()).join("model.onnx");
        let provider = match kind {
            BackendKind::Cuda => return Ok(Source::Cuda(cuda_engine(dir, version, config)?)),
            BackendKind::Onnxruntime => Provider::Cpu,
            BackendKind::OrtCuda => Provider::Cuda(config.ort_cuda.clone()),
            BackendKind::TensorRt => {
                Provider::TensorRt(Box::new(config.tensorrt_options(dir)), config.ort_cuda.clone())
            }
        };
        let options =
            OrtOptions { intra_threads: config.batching.intra_threads, provider, max_batch: config.max_batch_size };
        Ok(Source::Ort { runtime: runtime.clone(), model, options })
    }

    /// The smallest batch and sequence the backend accepts: 1, or TensorRT's profile minimum
    /// (a shape outside the profile fails rather than widening it).
    fn warm_shape(&self) -> (usize, usize) {
        match self {
            Source::Ort { options: OrtOptions { provider: Provider::TensorRt(t, _), .. }, .. } => {
                (t.batch.map_or(1, |b| b[0]), t.seq.map_or(1, |s| s[0]))
            }
            _ => (1, 1),
        }
    }

    fn open(&self) -> Result<Box<dyn Backend>, kiln_engine::EngineError> {
        Ok(match self {
            Source::Ort { runtime, model, options } => Box::new(OrtBackend::load(runtime, model, options)?),
            // One execution context (stream, arena, CUDA graphs) per executor.
            Source::Cuda(engine) => Box::new(
                kiln_cuda::backend::CudaBackend::new(engine)
                    .map_err(|e| kiln_engine::EngineError::Inference(e.to_string()))?,
            ),
        })
    }
}

impl Model {
    /// The labels of this version's `kiln_model_backend_info` series.
    pub(crate) fn backend_labels(&self) -> crate::metrics::BackendLabels {
        crate::metrics::BackendLabels {
            model: self.name.clone(),
            version: self.version.to_string(),
            requested: self.config.backend.name().into(),
            serving: self.serving.name().into(),
            engine: self.engine.into(),
            precision: self.precision.into(),
        }
    }

    /// The platform reported by the metadata endpoint (Triton's names where they exist).
    pub fn backend_name(&self) -> &'static str {
        match self.serving {
            BackendKind::Onnxruntime | BackendKind::TensorRt | BackendKind::OrtCuda => "onnxruntime_onnx",
            BackendKind::Cuda => "kiln_cuda_plan",
        }
    }

    /// Loads `dir` (a model directory of the repository): its config, then every
    /// version its policy selects, each warmed up before it is returned.
    /// `backend` overrides the config's (`kiln serve --backend`).
    pub fn load_all(
        dir: &Path,
        ort_library: &Path,
        backend: Option<BackendKind>,
        metrics: &Arc<Metrics>,
    ) -> Result<Vec<Arc<Self>>, ServerError> {
        let config_path = dir.join("config.toml");
        let mut config = ModelConfig::load(&config_path)?;
        if let Some(b) = backend {
            config.backend = b;
        }
        let bad = |reason: String| ServerError::Config { path: config_path.clone(), reason };
        let dir_name = dir.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        if config.name != dir_name {
            return Err(bad(format!("name: {:?} must match the directory name {dir_name:?}", config.name)));
        }
        let available = versions_on_disk(dir)?;
        let chosen = config.version_policy.select(&available).map_err(bad)?;
        if chosen.is_empty() {
            return Err(ServerError::Repository {
                path: dir.to_path_buf(),
                reason: "no version directory (e.g. 1/) containing model.onnx".into(),
            });
        }
        let runtime = OrtRuntime::load(ort_library).map_err(ServerError::Engine)?;
        chosen.into_iter().map(|v| Self::load_version(dir, &config, v, &runtime, metrics)).collect()
    }

    /// Opens the first backend of `backend` + `fallback` that loads here. Each failure is
    /// logged with its reason; if none loads, the error lists every backend's reason.
    fn first_backend(
        dir: &Path,
        config: &ModelConfig,
        version: u64,
        runtime: &OrtRuntime,
    ) -> Result<(BackendKind, Source, Box<dyn Backend>), ServerError> {
        let mut failures = Vec::new();
        for kind in BackendKind::order(config.backend, &config.fallback) {
            // The first run counts as loading: TensorRT builds (or deserialises) its engines
            // there, before any other executor opens the same cache, and a failure there
            // still falls back.
            let opened = Source::new(kind, dir, version, config, runtime).and_then(|source| {
                let mut backend = source.open()?;
                warm_up(backend.as_mut(), source.warm_shape())?;
                Ok((source, backend))
            });
            match opened {
                Ok((source, backend)) => {
                    if !failures.is_empty() {
                        tracing::warn!(
                            model = %config.name, version, requested = %config.backend, serving = %kind,
                            "backend {} could not load; serving with fallback {kind}: {}",
                            config.backend, failures.join("; ")
                        );
                    }
                    return Ok((kind, source, backend));
                }
                Err(e) => {
                    tracing::warn!(model = %config.name, version, backend = %kind, error = %e, "backend could not load");
                    failures.push(format!("backend {kind}: {e}"));
                }
            }
        }
        let hint = if config.fallback.is_empty() { " (no fallback configured)" } else { "" };
        Err(ServerError::ModelStart { name: config.name.clone(), reason: format!("{}{hint}", failures.join("; ")) })
    }

    fn load_version(
        dir: &Path,
        config: &ModelConfig,
        version: u64,
        runtime: &OrtRuntime,
        metrics: &Arc<Metrics>,
    ) -> Result<Arc<Self>, ServerError> {
        let config_path = dir.join("config.toml");
        let bad = |reason: String| ServerError::Config { path: config_path.clone(), reason };
        let (serving, source, probe) = Self::first_backend(dir, config, version, runtime)?;
        let metadata = probe.metadata().clone();
        let (engine, precision) = (probe.name(), probe.precision());
        // Requests are stacked along axis 0, so batching needs it dynamic everywhere.
        if config.max_batch_size > 1 {
            let fixed =
                metadata.inputs.iter().chain(&metadata.outputs).find(|t| t.shape.first() != Some(&Dim::Dynamic));
            if let Some(t) = fixed {
                return Err(bad(format!(
                    "max_batch_size: {:?} has no dynamic batch axis {:?}; set max_batch_size = 1 or export it with one",
                    t.name,
                    t.shape_i64()
                )));
            }
        }
        let classifier = match (&config.input, &config.output) {
            (Some(input), Some(output)) => Some(Classifier::new(dir, input, output, config, &metadata).map_err(bad)?),
            _ => None,
        };

        // Executor 0 reuses the probe backend (warmed up above); the others open their own and
        // run one warm-up batch before they report ready, so no first request is the slow one.
        let first = std::sync::Mutex::new(Some(probe));
        let factory = move |index: usize| -> Result<ModelExecutor, ExecutorError> {
            let reused = if index == 0 { first.lock().ok().and_then(|mut s| s.take()) } else { None };
            if let Some(backend) = reused {
                return Ok(ModelExecutor { backend });
            }
            let mut backend = source.open().map_err(|e| ExecutorError(e.to_string()))?;
            warm_up(backend.as_mut(), source.warm_shape())
                .map_err(|e| ExecutorError(format!("warm-up failed: {e}")))?;
            Ok(ModelExecutor { backend })
        };
        let observer = Some(metrics.model_observer(&config.name));
        let batcher = Batcher::spawn_observed(config.batcher_config(), observer, factory)
            .map_err(|e| ServerError::ModelStart { name: config.name.clone(), reason: e.to_string() })?;
        tracing::info!(model = %config.name, version, backend = engine, precision, "model loaded");
        Ok(Arc::new(Self {
            name: config.name.clone(),
            version,
            metadata,
            classifier,
            batcher,
            config: config.clone(),
            serving,
            engine,
            precision,
        }))
    }
}

/// The CUDA engine of one model version: its `model.plan`, or an FP16 plan
/// built from `model.onnx` (batch 1..=max_batch_size, sequence up to 512).
/// Tactics timed at load are kept in `timing.cache` beside the model.
fn cuda_engine(dir: &Path, version: u64, config: &ModelConfig) -> Result<Arc<kiln_cuda::engine::Engine>, ServerError> {
    use kiln_engine::builder::{BuildOptions, build};
    use kiln_engine::graph::Precision;
    use kiln_engine::plan::{Expect, Profile};
    let vdir = dir.join(version.to_string());
    let fail = |reason: String| ServerError::ModelStart { name: config.name.clone(), reason };
    // Before building a plan: without a GPU the build would be wasted (and a fallback waits).
    kiln_cuda::device::available().map_err(|e| fail(e.to_string()))?;
    let plan_file = vdir.join("model.plan");
    let plan = if plan_file.is_file() {
        kiln_engine::plan::load(&plan_file, &Expect::default()).map_err(|e| fail(e.to_string()))?
    } else {
        let onnx = vdir.join("model.onnx");
        let graph = kiln_engine::import::import_file(&onnx).map_err(|e| fail(e.to_string()))?;
        let max = config.max_batch_size.max(1);
        let mut profiles = vec![Profile { symbol: "batch".into(), min: 1, opt: max, max }];
        let uses_seq = graph.inputs.iter().any(|&i| {
            graph.shape(i).is_some_and(|s| s.iter().any(|d| d.symbols().iter().any(|x| x == kiln_engine::import::SEQ)))
        });
        if uses_seq {
            profiles.push(Profile { symbol: kiln_engine::import::SEQ.into(), min: 1, opt: 128, max: 512 });
        }
        // Image models take UINT8 pixels and normalise on the GPU (a quarter of the bytes over PCIe).
        let uint8_input = match &config.input {
            Some(input) => {
                let (scale, offset) = input.scale_offset().map_err(&fail)?;
                Some(kiln_engine::image_input::Uint8Input { scale, offset })
            }
            None => None,
        };
        let opts = BuildOptions {
            precision: Precision::F16,
            profiles,
            source: onnx.display().to_string(),
            uint8_input,
            ..BuildOptions::default()
        };
        build(graph, &opts, |_, _, _| {}).map_err(|e| fail(e.to_string()))?.0
    };
    let opts = kiln_cuda::engine::EngineOptions {
        timing_cache: Some(vdir.join("timing.cache")),
        // Batches of every size arrive: run them in power-of-two buckets, all prepared at load.
        batch_buckets: true,
        ..kiln_cuda::engine::EngineOptions::default()
    };
    kiln_cuda::engine::Engine::load(plan, &opts).map_err(|e| fail(e.to_string()))
}

/// Runs one batch of zeros (dynamic axes at `(batch, seq)`) through a fresh backend.
fn warm_up(backend: &mut dyn Backend, (batch, seq): (usize, usize)) -> Result<(), kiln_engine::EngineError> {
    let inputs = backend
        .metadata()
        .inputs
        .iter()
        .map(|spec| Tensor::zeros(spec.dtype, spec.concrete_shape(batch, seq)))
        .collect::<Result<Vec<_>, _>>()?;
    backend.run(&inputs).map(drop)
}

fn versions_on_disk(dir: &Path) -> Result<Vec<u64>, ServerError> {
    let io = |e: std::io::Error| ServerError::Repository { path: dir.to_path_buf(), reason: e.to_string() };
    let mut versions = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io)? {
        let entry = entry.map_err(io)?;
        let Some(version) = entry.file_name().to_str().and_then(|n| n.parse::<u64>().ok()) else { continue };
        if entry.path().join("model.onnx").is_file() {
            versions.push(version);
        }
    }
    Ok(versions)
}
