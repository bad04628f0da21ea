//! ONNX Runtime's GPU execution providers: TensorRT (kiln's TensorRT route: `tensorrt-rs`
//! targets the TensorRT 7 API, which TensorRT 10 removed) and CUDA.
//!
//! A provider is chosen per session. Before one is registered, [`probe`] checks that the
//! loaded ONNX Runtime was built with it and that the loader can find every library its
//! shared provider library needs, so a missing `libnvinfer.so.10` is a load error naming
//! the library and what to install, never a panic and never a silent CPU fallback.

pub mod probe;
mod tensorrt;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub(crate) use tensorrt::prepare as prepare_tensorrt;
pub use tensorrt::{CacheKey, ShapeProfiles, TrtSetup, cuda_options, profiles, tensorrt_options};

/// The execution provider one ONNX Runtime session runs on.
#[derive(Debug, Clone, Default, PartialEq)]
pub enum Provider {
    #[default]
    Cpu,
    Cuda(CudaOptions),
    /// TensorRT, with the CUDA provider's options for what runs behind it (`cuda_fallback`).
    TensorRt(Box<TensorRtOptions>, CudaOptions),
}

impl Provider {
    /// The name used in `config.toml` and on the command line.
    pub fn config_name(&self) -> &'static str {
        match self {
            Provider::Cpu => "cpu",
            Provider::Cuda(_) => "ort-cuda",
            Provider::TensorRt(..) => "tensorrt",
        }
    }

    /// ONNX Runtime's own identifier, as `GetAvailableProviders` lists it.
    pub fn ort_name(&self) -> &'static str {
        match self {
            Provider::Cpu => "CPUExecutionProvider",
            Provider::Cuda(_) => "CUDAExecutionProvider",
            Provider::TensorRt(..) => "TensorrtExecutionProvider",
        }
    }

    /// The backend name reported in logs, metadata and metrics.
    pub fn backend_name(&self) -> &'static str {
        match self {
            Provider::Cpu => "onnxruntime-cpu",
            Provider::Cuda(_) => "onnxruntime-cuda",
            Provider::TensorRt(..) => "onnxruntime-tensorrt",
        }
    }

    /// The arithmetic the provider is asked for. CPU and CUDA run the model's own types.
    pub fn precision(&self) -> &'static str {
        match self {
            Provider::Cpu | Provider::Cuda(_) => "fp32",
            Provider::TensorRt(t, _) => t.precision.name(),
        }
    }

    /// The file name of the shared provider library beside `libonnxruntime.so`.
    pub(crate) fn library_file(&self) -> Option<&'static str> {
        match self {
            Provider::Cpu => None,
            Provider::Cuda(_) => Some("libonnxruntime_providers_cuda.so"),
            Provider::TensorRt(..) => Some("libonnxruntime_providers_tensorrt.so"),
        }
    }
}

/// `[ort_cuda]` in a model's config: ONNX Runtime's CUDA execution provider.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CudaOptions {
    pub device_id: u32,
    /// Cap on the provider's memory arena; unset = no cap.
    pub memory_limit_mib: Option<u64>,
    pub conv_algo_search: ConvAlgoSearch,
    /// Replay the whole model as one CUDA graph (static shapes only, one input shape per session).
    pub cuda_graph: bool,
    /// NHWC convolutions (tensor cores without layout transposes).
    pub prefer_nhwc: bool,
    /// TF32 for FP32 matrix math on Ampere and newer.
    pub tf32: bool,
}

impl Default for CudaOptions {
    fn default() -> Self {
        Self {
            device_id: 0,
            memory_limit_mib: None,
            conv_algo_search: ConvAlgoSearch::Exhaustive,
            cuda_graph: false,
            prefer_nhwc: false,
            tf32: true,
        }
    }
}

/// How cuDNN convolution algorithms are chosen by the CUDA provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ConvAlgoSearch {
    /// Time every algorithm once per shape (ONNX Runtime's default; slow first run).
    Exhaustive,
    /// cuDNN's heuristics, no timing.
    Heuristic,
    /// The default algorithm.
    Default,
}

impl ConvAlgoSearch {
    pub(crate) fn ort_value(self) -> &'static str {
        match self {
            ConvAlgoSearch::Exhaustive => "EXHAUSTIVE",
            ConvAlgoSearch::Heuristic => "HEURISTIC",
            ConvAlgoSearch::Default => "DEFAULT",
        }
    }
}

/// The precision TensorRT may choose kernels in. INT8 also enables FP16 so that layers
/// without an INT8 kernel fall back to FP16 rather than FP32.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TrtPrecision {
    Fp32,
    #[default]
    Fp16,
    Int8,
}

impl TrtPrecision {
    pub fn name(self) -> &'static str {
        match self {
            TrtPrecision::Fp32 => "fp32",
            TrtPrecision::Fp16 => "fp16",
            TrtPrecision::Int8 => "int8",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "fp32" => Some(Self::Fp32),
            "fp16" => Some(Self::Fp16),
            "int8" => Some(Self::Int8),
            _ => None,
        }
    }
}

/// `[min, opt, max]` of one dynamic axis; TensorRT builds kernels for `opt` and accepts
/// any size in the range.
pub type AxisRange = [usize; 3];

/// `[tensorrt]` in a model's config (and the flags of `kiln build --backend tensorrt`).
/// Relative paths are resolved by the caller (the model directory for configs).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TensorRtOptions {
    pub precision: TrtPrecision,
    /// INT8 calibration table for models without Q/DQ nodes (TensorRT's or ONNX Runtime's format).
    pub int8_calibration_table: Option<PathBuf>,
    /// The table was written by TensorRT itself rather than ONNX Runtime's calibration tools.
    pub int8_native_calibration_table: bool,
    /// Where built engines are kept, one subdirectory per cache key; default `trt_cache`
    /// beside the model file.
    pub engine_cache_dir: Option<PathBuf>,
    /// TensorRT's timing cache (kernel timings shared by every engine built on this GPU);
    /// default `<engine_cache_dir>/timing`.
    pub timing_cache_dir: Option<PathBuf>,
    /// Builder workspace; unset = TensorRT's default (the device's memory).
    pub workspace_mib: Option<u64>,
    pub device_id: u32,
    /// TensorRT builder optimisation level 0..=5 (higher: longer builds, faster engines).
    pub builder_optimization_level: Option<u8>,
    /// Smallest subgraph handed to TensorRT; smaller ones stay on the CUDA provider.
    pub min_subgraph_size: Option<usize>,
    /// Capture each engine's execution in a CUDA graph.
    pub cuda_graph: bool,
    /// Batch axis profile; default `[1, max_batch_size, max_batch_size]`.
    pub batch: Option<AxisRange>,
    /// Every other dynamic axis (sequence length); default `[1, 128, 512]`.
    pub seq: Option<AxisRange>,
    /// Register the CUDA provider behind TensorRT for the nodes TensorRT does not take.
    pub cuda_fallback: bool,
}

impl Default for TensorRtOptions {
    fn default() -> Self {
        Self {
            precision: TrtPrecision::Fp16,
            int8_calibration_table: None,
            int8_native_calibration_table: false,
            engine_cache_dir: None,
            timing_cache_dir: None,
            workspace_mib: None,
            device_id: 0,
            builder_optimization_level: None,
            min_subgraph_size: None,
            cuda_graph: false,
            batch: None,
            seq: None,
            cuda_fallback: true,
        }
    }
}

impl TensorRtOptions {
    /// Checks the values that need no files; every error names the field.
    pub fn validate(&self) -> Result<(), String> {
        for (name, range) in [("batch", self.batch), ("seq", self.seq)] {
            if let Some([min, opt, max]) = range
                && !(1 <= min && min <= opt && opt <= max)
            {
                return Err(format!("tensorrt.{name}: [{min}, {opt}, {max}] must satisfy 1 <= min <= opt <= max"));
            }
        }
        if self.builder_optimization_level.is_some_and(|l| l > 5) {
            return Err("tensorrt.builder_optimization_level: must be between 0 and 5".into());
        }
        if self.workspace_mib == Some(0) {
            return Err("tensorrt.workspace_mib: must be at least 1 (omit it for TensorRT's default)".into());
        }
        if self.int8_calibration_table.is_some() && self.precision != TrtPrecision::Int8 {
            return Err("tensorrt.int8_calibration_table: only used with precision = \"int8\"".into());
        }
        Ok(())
    }
}
