//! kiln's CUDA engine. A plan from `kiln build` is lowered to a list of steps —
//! cuBLASLt GEMMs (dense layers, 1×1 convolutions), cuDNN fused convolutions and
//! kiln's own NVRTC kernels for everything else — over one activation arena and
//! weights uploaded once. Tactics (GEMM and convolution algorithms) are timed on
//! the GPU and remembered in a timing cache file; each batch size's step list is
//! captured once as a CUDA graph and replayed.
//!
//! Nothing here panics without CUDA: [`device::available`] and [`device::Device::open`]
//! probe the driver, NVRTC, cuBLASLt and cuDNN first and return [`CudaError::Unavailable`].

pub mod backend;
pub mod blas;
pub mod buckets;
pub mod device;
pub mod dnn;
pub mod engine;
mod error;
pub mod ffi;
pub mod kernels;
pub mod lower;
pub mod sim;
pub mod tactics;

pub use error::CudaError;
