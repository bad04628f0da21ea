//! Lowering a plan's graph to device work, in two phases.
//!
//! [`Analysis`] runs once per engine at the largest binding (every profile at
//! its max): it decides where each node runs, what element type each tensor
//! has on the device, which casts the precision boundaries need, lays every
//! weight out in one blob and every activation in one arena (through the
//! engine's memory planner), so that one arena per execution context serves
//! every batch size. [`emit`] then turns the device nodes into concrete
//! [`Step`]s for one binding and one context's buffers.
//!
//! Placement: integer and boolean nodes fed only by graph inputs, constants
//! and other such nodes (shape arithmetic, attention-mask bookkeeping) run on
//! the host with the reference ops, once per run, before the upload; they are
//! tiny, and keeping them off the GPU keeps the device graph free of data-
//! dependent shapes. Everything producing floats runs on the device.
//!
//! INT8 layers (nodes carrying calibrated scales) become one [`DevOpKind::Int8`]
//! each, planned and emitted by `int8.rs`: quantise, integer product, requantise.

mod analysis;
mod emit;
mod int8;
mod ops;

pub use analysis::{
    Analysis, DVal, DevOp, DevOpKind, Storage, Transfer, tensor_bytes, tensor_from_bytes, write_tensor_bytes,
};
pub use emit::{Bases, Step, StepKind, emit};
pub use int8::{ConvGeometry, GEMM_MIN_ROWS, Int8Form, Int8Layer};

use std::collections::HashMap;

/// Values of the plan's symbols (`batch`, `seq`) for one run.
pub type Binding = HashMap<String, usize>;

/// Alignment of every weight and arena buffer: cuBLASLt and cuDNN want 16 bytes
/// for vectorised FP16 access; 256 matches the driver's allocation granularity.
pub const ALIGN: usize = 256;
