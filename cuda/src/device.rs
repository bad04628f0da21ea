//! One opened GPU for the engine: kiln-kernels' [`Gpu`] (context, NVRTC
//! modules, disk cache) plus the checks that cuBLASLt and cuDNN load.

use std::sync::Arc;

use cudarc::driver::{CudaFunction, CudaStream};
use kiln_kernels::sources::KernelSource;
use kiln_kernels::toolchain::{self, Gpu};

use crate::CudaError;
use crate::ffi::mem;

#[derive(Debug, Clone)]
pub struct Device {
    gpu: Arc<Gpu>,
}

/// `Ok` when a GPU, the driver, NVRTC, cuBLASLt and cuDNN are all present:
/// the same checks [`Device::open`] makes, without creating a context.
pub fn available() -> Result<(), CudaError> {
    toolchain::cuda_available()?;
    libraries_present()
}

fn libraries_present() -> Result<(), CudaError> {
    if !mem::cublaslt_present() {
        return Err(CudaError::Unavailable("cuBLASLt (libcublasLt.so) not found on the library path".into()));
    }
    if !mem::cudnn_present() {
        return Err(CudaError::Unavailable("cuDNN 9 (libcudnn.so) not found on the library path".into()));
    }
    Ok(())
}

impl Device {
    /// Opens GPU `ordinal`. Never panics without CUDA: each library is probed first.
    pub fn open(ordinal: usize) -> Result<Self, CudaError> {
        toolchain::cuda_available()?;
        libraries_present()?;
        let gpu = Gpu::open(ordinal)?;
        mem::disable_event_tracking(&gpu.ctx);
        Ok(Self { gpu: Arc::new(gpu) })
    }

    pub fn gpu(&self) -> &Gpu {
        &self.gpu
    }

    /// `sm_XY` of the device.
    pub fn arch(&self) -> &str {
        self.gpu.arch()
    }

    pub fn name(&self) -> &str {
        self.gpu.name()
    }

    /// A new non-blocking stream (one per execution context).
    pub fn new_stream(&self) -> Result<Arc<CudaStream>, CudaError> {
        self.gpu.ctx.new_stream().map_err(CudaError::driver("create stream"))
    }

    /// Function `name` of the embedded kernel `src`, compiled on first use.
    pub fn function(&self, src: &KernelSource, name: &str) -> Result<CudaFunction, CudaError> {
        Ok(self.gpu.function(src, name)?)
    }
}
