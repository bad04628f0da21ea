//! The crate's only `unsafe` code: raw kernel launches, device memory copies,
//! stream capture, and the cuBLASLt and cuDNN calls, each behind a safe function
//! whose preconditions are checked (or guaranteed by construction) by its caller
//! in this crate. Device memory is addressed by raw [`DevPtr`]s into buffers the
//! engine owns for its whole life (the weights and the activation arena), so the
//! executor never juggles typed slices per node.
#![allow(unsafe_code)]

pub mod blas;
pub mod dnn;
pub mod launch;
pub mod mem;

/// A raw device address (`CUdeviceptr`).
pub type DevPtr = u64;
