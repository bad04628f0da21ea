use kiln_engine::EngineError;
use kiln_engine::graph::{GraphError, NodeIssue};
use kiln_kernels::KernelError;

/// Everything the CUDA engine can fail with. Messages may name local paths and
/// node names; the server maps them to its own client-facing errors.
#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    /// No driver, no NVRTC, no device, or a library (cuBLASLt, cuDNN) missing.
    #[error("CUDA unavailable: {0}")]
    Unavailable(String),
    #[error(transparent)]
    Kernel(#[from] KernelError),
    #[error("CUDA driver: {0}")]
    Driver(String),
    #[error("cuBLASLt: {0}")]
    Blas(String),
    #[error("cuDNN: {0}")]
    Dnn(String),
    /// Nodes the CUDA engine has no implementation for, all listed at once.
    #[error("the CUDA engine cannot run {} node(s):{}", .0.len(), list(.0))]
    Unsupported(Vec<NodeIssue>),
    #[error(transparent)]
    Plan(#[from] GraphError),
    #[error("input {name}: {reason}")]
    Input { name: String, reason: String },
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("timing cache {path}: {reason}")]
    TimingCache { path: std::path::PathBuf, reason: String },
}

fn list(issues: &[NodeIssue]) -> String {
    issues.iter().map(|i| format!("\n  - {i}")).collect()
}

impl CudaError {
    /// Maps a driver error to [`CudaError::Driver`], naming the step that failed.
    pub fn driver(what: &'static str) -> impl Fn(cudarc::driver::DriverError) -> CudaError {
        move |e| CudaError::Driver(format!("{what}: {e:?}"))
    }
}

impl From<CudaError> for EngineError {
    fn from(e: CudaError) -> Self {
        match e {
            CudaError::Input { name, reason } => EngineError::InvalidInput { name, reason },
            CudaError::Unsupported(_) => {
                EngineError::Unsupported { what: "node for the CUDA engine", detail: e.to_string() }
            }
            other => EngineError::Inference(other.to_string()),
        }
    }
}
