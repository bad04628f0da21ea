use crate::{DType, EngineError, Tensor};

/// One axis of a declared tensor shape: fixed, or decided per request (batch, sequence).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dim {
    Fixed(usize),
    Dynamic,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TensorSpec {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<Dim>,
}

impl TensorSpec {
    /// A concrete shape: dynamic axis 0 becomes `batch`, any other dynamic axis `seq`.
    pub fn concrete_shape(&self, batch: usize, seq: usize) -> Vec<usize> {
        self.shape
            .iter()
            .enumerate()
            .map(|(axis, d)| match d {
                Dim::Fixed(n) => *n,
                Dim::Dynamic if axis == 0 => batch,
                Dim::Dynamic => seq,
            })
            .collect()
    }

    /// Shape as the KServe protocol reports it: -1 for dynamic axes.
    pub fn shape_i64(&self) -> Vec<i64> {
        self.shape
            .iter()
            .map(|d| match d {
                Dim::Fixed(n) => i64::try_from(*n).unwrap_or(i64::MAX),
                Dim::Dynamic => -1,
            })
            .collect()
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ModelMetadata {
    pub inputs: Vec<TensorSpec>,
    pub outputs: Vec<TensorSpec>,
}

/// A loaded model that can execute batches. Implementations own their device state and
/// run on the executor thread that created them, so `run` takes `&mut self` and no locks.
pub trait Backend: Send {
    /// Short name for logs and metrics (e.g. `onnxruntime-cpu`).
    fn name(&self) -> &'static str;

    /// The arithmetic it was built or asked for (`fp32`, `fp16`, `int8`), for metadata and metrics.
    fn precision(&self) -> &'static str {
        "fp32"
    }

    fn metadata(&self) -> &ModelMetadata;

    /// Runs one batch. `inputs` follow `metadata().inputs` order; the result follows
    /// `metadata().outputs` order and keeps the batch axis first.
    fn run(&mut self, inputs: &[Tensor]) -> Result<Vec<Tensor>, EngineError>;
}
