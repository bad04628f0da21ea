//! kiln's execution layer: the tensor types every backend shares, the [`Backend`]
//! trait the batcher's executors drive, and the ONNX Runtime CPU backend.

mod backend;
mod error;
mod ort_backend;
mod tensor;

pub use backend::{Backend, Dim, ModelMetadata, TensorSpec};
pub use error::EngineError;
pub use ort_backend::{OrtBackend, OrtOptions, OrtRuntime};
pub use tensor::{DType, Tensor, TensorData, f16};
