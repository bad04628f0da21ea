//! A served model: its config, labels, preprocessing, and the batcher whose executors
//! own the backend instances.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use kiln_batcher::{Batcher, Executor, ExecutorError, Payload};
use kiln_engine::{Backend, DType, Dim, ModelMetadata, OrtBackend, OrtOptions, OrtRuntime, Tensor, TensorData};
use serde::Serialize;

use crate::ServerError;
use crate::config::{BackendKind, ModelConfig};
use crate::preprocess::Preprocess;

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

impl Executor for ModelExecutor {
    type Input = ModelInput;
    type Output = Vec<Tensor>;

    fn execute(&mut self, inputs: &[&ModelInput]) -> Result<Vec<Vec<Tensor>>, ExecutorError> {
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

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Class {
    pub label: String,
    pub class_id: usize,
    pub score: f32,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Prediction {
    pub label: String,
    pub class_id: usize,
    pub score: f32,
    pub top_k: Vec<Class>,
}

#[derive(Debug)]
pub struct Model {
    pub name: String,
    pub version: u64,
    pub config: ModelConfig,
    pub metadata: ModelMetadata,
    pub preprocess: Preprocess,
    labels: Vec<String>,
    output_index: usize,
    pub batcher: Batcher<ModelExecutor>,
}

impl Model {
    /// Loads `dir` (a model directory of the repository): config, newest numbered
    /// version, labels, and one backend instance per `instance_count`.
    pub fn load(dir: &Path, ort_library: &Path) -> Result<Arc<Self>, ServerError> {
        let config_path = dir.join("config.toml");
        let config = ModelConfig::load(&config_path)?;
        let bad = |reason: String| ServerError::Config { path: config_path.clone(), reason };
        let dir_name = dir.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        if config.name != dir_name {
            return Err(bad(format!("name: {:?} must match the directory name {dir_name:?}", config.name)));
        }
        let (version, model_file) = newest_version(dir)?;
        let labels = match &config.output.labels {
            Some(file) => read_labels(&dir.join(file)).map_err(|e| bad(format!("output.labels: {e}")))?,
            None => Vec::new(),
        };
        let preprocess = Preprocess::new(&config.input).map_err(bad)?;

        let runtime = OrtRuntime::load(ort_library).map_err(ServerError::Engine)?;
        let options = OrtOptions { intra_threads: config.batching.intra_threads };
        let probe = match config.backend {
            BackendKind::Onnxruntime => OrtBackend::load(&runtime, &model_file, &options)?,
        };
        let metadata = probe.metadata().clone();
        let output_index = check_signature(&config, &metadata, &preprocess, labels.len()).map_err(bad)?;

        // Executor 0 reuses the probe session; the others load their own.
        let first = std::sync::Mutex::new(Some(probe));
        let factory = move |index: usize| -> Result<ModelExecutor, ExecutorError> {
            let reused = if index == 0 { first.lock().ok().and_then(|mut s| s.take()) } else { None };
            let backend = match reused {
                Some(b) => b,
                None => OrtBackend::load(&runtime, &model_file, &options).map_err(|e| ExecutorError(e.to_string()))?,
            };
            Ok(ModelExecutor { backend: Box::new(backend) })
        };
        let batcher = Batcher::spawn(config.batcher_config(), factory)
            .map_err(|e| ServerError::ModelStart { name: config.name.clone(), reason: e.to_string() })?;
        tracing::info!(model = %config.name, version, backend = "onnxruntime-cpu", "model loaded");
        Ok(Arc::new(Self {
            name: config.name.clone(),
            version,
            metadata,
            preprocess,
            labels,
            output_index,
            batcher,
            config,
        }))
    }

    /// Turns one request's output tensors into one prediction per item.
    pub fn postprocess(&self, outputs: &[Tensor]) -> Result<Vec<Prediction>, String> {
        let out = outputs.get(self.output_index).ok_or("missing output")?;
        let values = out.as_f32().ok_or("output is not FP32")?;
        let items = out.batch().max(1);
        let classes = values.len() / items;
        if classes == 0 {
            return Err("empty output".into());
        }
        Ok(values.chunks_exact(classes).map(|row| self.predict(row)).collect())
    }

    fn predict(&self, logits: &[f32]) -> Prediction {
        let scores = if self.config.output.softmax { softmax(logits) } else { logits.to_vec() };
        let mut order: Vec<usize> = (0..scores.len()).collect();
        let k = self.config.output.top_k.min(order.len());
        // Sort descending by score; NaN (never expected) sorts last instead of panicking.
        order.sort_unstable_by(|&a, &b| scores[b].total_cmp(&scores[a]));
        let top_k: Vec<Class> =
            order[..k].iter().map(|&i| Class { label: self.label(i), class_id: i, score: scores[i] }).collect();
        let best = top_k.first().cloned().unwrap_or(Class { label: String::new(), class_id: 0, score: 0.0 });
        Prediction { label: best.label, class_id: best.class_id, score: best.score, top_k }
    }

    fn label(&self, class: usize) -> String {
        self.labels.get(class).cloned().unwrap_or_else(|| class.to_string())
    }

    /// Builds the input tensor for `items` images already preprocessed into `data`.
    pub fn image_input(&self, items: usize, data: Vec<f32>) -> Result<ModelInput, String> {
        let mut shape = vec![items];
        shape.extend(self.preprocess.item_shape());
        Tensor::new(shape, TensorData::F32(data)).map(|t| ModelInput(vec![t])).map_err(|e| e.to_string())
    }
}

fn softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exps: Vec<f32> = logits.iter().map(|&x| (x - max).exp()).collect();
    let sum: f32 = exps.iter().sum();
    exps.into_iter().map(|e| e / sum).collect()
}

/// The model must take one FP32 image tensor shaped like the preprocessing output, and
/// produce the configured output; returns that output's index.
fn check_signature(
    config: &ModelConfig,
    meta: &ModelMetadata,
    pre: &Preprocess,
    labels: usize,
) -> Result<usize, String> {
    let [input] = meta.inputs.as_slice() else {
        return Err(format!("the model has {} inputs; image models take exactly one", meta.inputs.len()));
    };
    if input.name != config.input.name {
        return Err(format!("input.name: {:?} but the model's input is {:?}", config.input.name, input.name));
    }
    if input.dtype != DType::F32 {
        return Err(format!("input: the model's input is {}, expected FP32", input.dtype));
    }
    let expected = pre.item_shape();
    let fits = input.shape.len() == 4
        && input.shape[1..].iter().zip(expected).all(|(d, e)| matches!(d, Dim::Dynamic) || *d == Dim::Fixed(e));
    if !fits {
        return Err(format!(
            "input.crop/layout: the model's input shape {:?} does not take {expected:?}",
            input.shape_i64()
        ));
    }
    if input.shape[0] != Dim::Dynamic && config.max_batch_size > 1 {
        return Err("max_batch_size: the model's batch axis is fixed; export it with a dynamic batch axis".into());
    }
    let index = meta
        .outputs
        .iter()
        .position(|o| o.name == config.output.name)
        .ok_or_else(|| format!("output.name: the model has no output {:?}", config.output.name))?;
    let output = &meta.outputs[index];
    if output.dtype != DType::F32 {
        return Err(format!("output: the model's output is {}, expected FP32", output.dtype));
    }
    if let Some(Dim::Fixed(classes)) = output.shape.last()
        && labels > 0
        && *classes != labels
    {
        return Err(format!("output.labels: {labels} labels for {classes} classes"));
    }
    Ok(index)
}

fn newest_version(dir: &Path) -> Result<(u64, PathBuf), ServerError> {
    let io = |e: std::io::Error| ServerError::Repository { path: dir.to_path_buf(), reason: e.to_string() };
    let mut best: Option<(u64, PathBuf)> = None;
    for entry in std::fs::read_dir(dir).map_err(io)? {
        let entry = entry.map_err(io)?;
        let Some(version) = entry.file_name().to_str().and_then(|n| n.parse::<u64>().ok()) else { continue };
        let file = entry.path().join("model.onnx");
        if file.is_file() && best.as_ref().is_none_or(|(v, _)| version > *v) {
            best = Some((version, file));
        }
    }
    best.ok_or_else(|| ServerError::Repository {
        path: dir.to_path_buf(),
        reason: "no version directory (e.g. 1/) containing model.onnx".into(),
    })
}

fn read_labels(path: &Path) -> Result<Vec<String>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    Ok(text.lines().map(|l| l.trim().to_string()).collect())
}
