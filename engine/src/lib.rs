//! kiln's execution layer: the tensor types every backend shares, the [`Backend`]
//! trait the batcher's executors drive, the ONNX Runtime backend (CPU, or the TensorRT and
//! CUDA execution providers), and the engine builder (ONNX import → graph IR → passes →
//! plan file) with its CPU reference executor.

mod backend;
pub mod builder;
mod error;
pub mod graph;
pub mod image_input;
pub mod import;
pub mod infer;
pub mod memory;
pub mod ops;
mod ort_backend;
pub mod passes;
pub mod plan;
pub mod providers;
pub mod quant;
pub mod reference;
mod tensor;
pub mod verify;

pub use backend::{Backend, Dim, ModelMetadata, TensorSpec};
pub use error::EngineError;
pub use ort_backend::{OrtBackend, OrtOptions, OrtRuntime};
pub use tensor::{DType, Tensor, TensorData, f16};
