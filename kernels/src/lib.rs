//! kiln's GPU kernel foundation. Kernels are `.cu` files embedded in this crate
//! ([`sources`]) and compiled by NVRTC at run time for the device's
//! architecture, with the result cached on disk ([`toolchain`]). Every kernel
//! has a CPU reference implementation of the same math (e.g.
//! [`preprocess::cpu`]), which the CPU backends use too, so CPU and GPU see the
//! same numbers. Nothing here panics on a machine without CUDA: every entry
//! point checks for the libraries first and returns [`KernelError::CudaUnavailable`].

mod cuda_sys;
mod error;
pub mod pipeline;
pub mod preprocess;
pub mod sources;
pub mod toolchain;

pub use error::KernelError;
