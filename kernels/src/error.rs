/// Everything the kernel layer can fail with.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// No CUDA driver, no NVRTC library, or no device: callers fall back or report.
    #[error("CUDA unavailable: {0}")]
    CudaUnavailable(String),
    /// NVRTC rejected a kernel; the log is NVRTC's own.
    #[error("NVRTC failed to compile {kernel} for {arch}:\n{log}")]
    Compile { kernel: String, arch: String, log: String },
    #[error("CUDA driver: {0}")]
    Driver(String),
    #[error("kernel cache {path}: {reason}")]
    Cache { path: std::path::PathBuf, reason: String },
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
}

impl KernelError {
    /// Maps a driver error to [`KernelError::Driver`], naming the step that failed.
    pub fn driver(what: &'static str) -> impl Fn(cudarc::driver::DriverError) -> KernelError {
        move |e| KernelError::Driver(format!("{what}: {e:?}"))
    }
}
