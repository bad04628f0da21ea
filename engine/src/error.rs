use std::path::PathBuf;

use crate::DType;

/// Everything the engine layer can fail with. Messages may name local paths: the
/// server maps these to its own client-facing errors and never forwards them verbatim.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("ONNX Runtime library could not be loaded from {path}: {reason}")]
    RuntimeLibrary { path: PathBuf, reason: String },
    #[error("ONNX Runtime was already initialised from {loaded}; cannot switch to {requested}")]
    RuntimeConflict { loaded: PathBuf, requested: PathBuf },
    #[error("model file {path} not found")]
    ModelNotFound { path: PathBuf },
    #[error("failed to load model {path}: {reason}")]
    ModelLoad { path: PathBuf, reason: String },
    #[error("model has an unsupported {what}: {detail}")]
    Unsupported { what: &'static str, detail: String },
    #[error("input {name}: {reason}")]
    InvalidInput { name: String, reason: String },
    #[error("expected {expected} inputs, got {got}")]
    InputCount { expected: usize, got: usize },
    #[error("tensor dtype mismatch: expected {expected}, got {got}")]
    DTypeMismatch { expected: DType, got: DType },
    #[error("tensor shape {shape:?} does not match {len} elements")]
    ShapeMismatch { shape: Vec<usize>, len: usize },
    /// A GPU execution provider cannot run here; `detail` says what is missing and what to install.
    #[error("{provider} is unavailable: {detail}")]
    ProviderUnavailable { provider: &'static str, detail: String },
    #[error("inference failed: {0}")]
    Inference(String),
}

impl EngineError {
    pub(crate) fn inference(e: impl std::fmt::Display) -> Self {
        Self::Inference(e.to_string())
    }
}
