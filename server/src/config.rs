//! Model configuration (`models/<name>/config.toml`). Unknown fields are rejected so
//! that a typo fails at start-up instead of silently using a default.

use std::path::{Path, PathBuf};
use std::time::Duration;

use kiln_batcher::BatcherConfig;
use kiln_engine::providers::{CudaOptions, TensorRtOptions};
use serde::Deserialize;

use crate::ServerError;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    pub name: String,
    #[serde(default)]
    pub backend: BackendKind,
    /// Backends to try, in order, when `backend` cannot load here (e.g. `["ort-cuda", "cpu"]`).
    /// Empty: a backend that cannot load fails the model.
    #[serde(default)]
    pub fallback: Vec<BackendKind>,
    /// ONNX Runtime's TensorRT provider (`backend = "tensorrt"`); paths relative to this directory.
    #[serde(default)]
    pub tensorrt: TensorRtOptions,
    /// ONNX Runtime's CUDA provider (`backend = "ort-cuda"`, and behind TensorRT).
    #[serde(default)]
    pub ort_cuda: CudaOptions,
    pub max_batch_size: usize,
    #[serde(default)]
    pub batching: BatchingConfig,
    #[serde(default)]
    pub version_policy: VersionPolicy,
    /// Image input: how `/predict` turns an upload into the model's input tensor.
    pub input: Option<InputConfig>,
    /// Classification output for `/predict`. Both tables or neither.
    pub output: Option<OutputConfig>,
}

/// Which numbered versions of a model serve: the newest `latest` (default 1), or exactly
/// the `specific` ones. Requests that name no version get the newest loaded one.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VersionPolicy {
    pub latest: Option<usize>,
    pub specific: Option<Vec<u64>>,
}

impl VersionPolicy {
    /// The versions to load from those `available` on disk, newest first.
    pub fn select(&self, available: &[u64]) -> Result<Vec<u64>, String> {
        let mut sorted = available.to_vec();
        sorted.sort_unstable_by(|a, b| b.cmp(a));
        match &self.specific {
            Some(wanted) => {
                if let Some(missing) = wanted.iter().find(|v| !sorted.contains(v)) {
                    return Err(format!("version_policy.specific: version {missing} has no model.onnx"));
                }
                Ok(sorted.into_iter().filter(|v| wanted.contains(v)).collect())
            }
            None => Ok(sorted.into_iter().take(self.latest.unwrap_or(1)).collect()),
        }
    }

    fn validate(&self) -> Result<(), String> {
        match (self.latest, &self.specific) {
            (Some(_), Some(_)) => Err("version_policy: give either latest or specific, not both".into()),
            (Some(0), None) => Err("version_policy.latest: must be at least 1".into()),
            (None, Some(v)) if v.is_empty() => Err("version_policy.specific: list at least one version".into()),
            _ => Ok(()),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub enum BackendKind {
    /// ONNX Runtime on the CPU.
    #[default]
    #[serde(rename = "cpu", alias = "onnxruntime")]
    Onnxruntime,
    /// kiln's CUDA engine: `<version>/model.plan` if present, else an FP16 plan
    /// built from `model.onnx` at load (tactics timed on the GPU then).
    #[serde(rename = "cuda")]
    Cuda,
    /// ONNX Runtime's TensorRT provider (engines cached per model, precision, profile, GPU
    /// and TensorRT version), with the CUDA provider behind it for what TensorRT does not take.
    #[serde(rename = "tensorrt")]
    TensorRt,
    /// ONNX Runtime's CUDA provider.
    #[serde(rename = "ort-cuda")]
    OrtCuda,
}

impl BackendKind {
    /// The name used in `config.toml`, on the command line and in metrics.
    pub fn name(self) -> &'static str {
        match self {
            BackendKind::Onnxruntime => "cpu",
            BackendKind::Cuda => "cuda",
            BackendKind::TensorRt => "tensorrt",
            BackendKind::OrtCuda => "ort-cuda",
        }
    }

    /// Parses a config/command-line name (`onnxruntime` is accepted for `cpu`).
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "cpu" | "onnxruntime" => BackendKind::Onnxruntime,
            "cuda" => BackendKind::Cuda,
            "tensorrt" => BackendKind::TensorRt,
            "ort-cuda" => BackendKind::OrtCuda,
            _ => return None,
        })
    }

    /// `backend` first, then the fallbacks, each once.
    pub fn order(first: Self, fallback: &[Self]) -> Vec<Self> {
        let mut order = vec![first];
        for &b in fallback {
            if !order.contains(&b) {
                order.push(b);
            }
        }
        order
    }
}

impl std::fmt::Display for BackendKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The `[batching]` table: the model's scheduling (see `kiln-batcher` for semantics).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchingConfig {
    /// Longest wait for a batch to fill; the upper bound when `target_p99_ms` is set.
    #[serde(default = "default_delay_us")]
    pub max_queue_delay_us: u64,
    /// Batch sizes dispatched as soon as they are reached.
    #[serde(default)]
    pub preferred_batch_sizes: Vec<usize>,
    #[serde(default = "default_queue_size")]
    pub max_queue_size: usize,
    #[serde(default = "default_instances")]
    pub instance_count: usize,
    /// ONNX Runtime intra-op threads per instance; 0 = one per core.
    #[serde(default)]
    pub intra_threads: usize,
    /// Queue deadline for requests that set none (`timeout_ms`); unset = no deadline.
    pub default_timeout_ms: Option<u64>,
    /// Priority levels 1..=N (1 highest); requests choose with `priority`.
    #[serde(default = "default_one")]
    pub priority_levels: u32,
    #[serde(default = "default_one")]
    pub default_priority_level: u32,
    /// A waiting request rises one level per this much waiting (anti-starvation).
    #[serde(default = "default_aging_ms")]
    pub priority_aging_ms: u64,
    /// Adaptive delay: keep p99 latency under this target while growing batches.
    pub target_p99_ms: Option<f64>,
}

fn default_one() -> u32 {
    1
}
fn default_aging_ms() -> u64 {
    100
}

fn default_delay_us() -> u64 {
    2000
}
fn default_queue_size() -> usize {
    1024
}
fn default_instances() -> usize {
    1
}

impl Default for BatchingConfig {
    fn default() -> Self {
        Self {
            max_queue_delay_us: default_delay_us(),
            preferred_batch_sizes: Vec::new(),
            max_queue_size: default_queue_size(),
            instance_count: default_instances(),
            intra_threads: 0,
            default_timeout_ms: None,
            priority_levels: 1,
            default_priority_level: 1,
            priority_aging_ms: default_aging_ms(),
            target_p99_ms: None,
        }
    }
}

impl ModelConfig {
    /// The `[tensorrt]` table with its relative paths resolved against the model directory `dir`.
    pub fn tensorrt_options(&self, dir: &Path) -> TensorRtOptions {
        let mut trt = self.tensorrt.clone();
        for path in [&mut trt.engine_cache_dir, &mut trt.timing_cache_dir, &mut trt.int8_calibration_table] {
            if let Some(p) = path.as_mut().filter(|p| p.is_relative()) {
                *p = dir.join(&*p);
            }
        }
        trt
    }

    /// The batcher's view of this model.
    pub fn batcher_config(&self) -> BatcherConfig {
        let b = &self.batching;
        BatcherConfig {
            max_batch_size: self.max_batch_size,
            max_queue_delay: Duration::from_micros(b.max_queue_delay_us),
            preferred_batch_sizes: b.preferred_batch_sizes.clone(),
            max_queue_size: b.max_queue_size,
            instance_count: b.instance_count,
            default_timeout: b.default_timeout_ms.map(Duration::from_millis),
            priority_levels: b.priority_levels,
            default_priority: b.default_priority_level,
            priority_aging: Duration::from_millis(b.priority_aging_ms),
            target_p99: b.target_p99_ms.map(|ms| Duration::from_secs_f64(ms / 1e3)),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ColorOrder {
    Rgb,
    Bgr,
    /// One channel: luma `0.299 R + 0.587 G + 0.114 B` (ITU-R 601, as PIL's "L" mode);
    /// only the first entry of mean/std (or scale/offset) applies.
    Gray,
}

impl ColorOrder {
    pub fn channels(self) -> usize {
        match self {
            ColorOrder::Rgb | ColorOrder::Bgr => 3,
            ColorOrder::Gray => 1,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Layout {
    Nchw,
    Nhwc,
}

/// How an uploaded image becomes the model's input tensor.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputConfig {
    pub name: String,
    /// Resize so the shorter side has this length (aspect kept) before cropping.
    pub resize_shorter: Option<u32>,
    /// Centre crop, `[height, width]`; also the model's spatial input size.
    pub crop: [u32; 2],
    #[serde(default = "default_color")]
    pub color: ColorOrder,
    #[serde(default = "default_layout")]
    pub layout: Layout,
    /// `(pixel - mean) / std` with pixels in 0..=255 ...
    pub mean: Option<[f32; 3]>,
    pub std: Option<[f32; 3]>,
    /// ... or `pixel * scale + offset`. Not both.
    pub scale: Option<[f32; 3]>,
    pub offset: Option<[f32; 3]>,
}

fn default_color() -> ColorOrder {
    ColorOrder::Rgb
}
fn default_layout() -> Layout {
    Layout::Nchw
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputConfig {
    pub name: String,
    #[serde(default)]
    pub softmax: bool,
    #[serde(default = "default_top_k")]
    pub top_k: usize,
    /// File with one class name per line, relative to the model's directory.
    pub labels: Option<PathBuf>,
}

fn default_top_k() -> usize {
    5
}

impl InputConfig {
    /// The normalisation as `pixel * scale + offset`, whichever way the config wrote it.
    pub fn scale_offset(&self) -> Result<([f32; 3], [f32; 3]), String> {
        match (self.mean, self.std, self.scale, self.offset) {
            (mean, std, None, None) => {
                let mean = mean.unwrap_or([0.0; 3]);
                let std = std.unwrap_or([1.0; 3]);
                if std.iter().any(|s| !s.is_finite() || *s == 0.0) {
                    return Err("input.std: every entry must be a non-zero number".into());
                }
                Ok((std.map(|s| 1.0 / s), [0, 1, 2].map(|c| -mean[c] / std[c])))
            }
            (None, None, scale, offset) => Ok((scale.unwrap_or([1.0; 3]), offset.unwrap_or([0.0; 3]))),
            _ => Err("input: give either mean/std or scale/offset, not both".into()),
        }
    }
}

impl ModelConfig {
    /// Reads and validates `path`; every error names the file and the field.
    pub fn load(path: &Path) -> Result<Self, ServerError> {
        let bad = |reason: String| ServerError::Config { path: path.to_path_buf(), reason };
        let text = std::fs::read_to_string(path).map_err(|e| bad(format!("cannot read: {e}")))?;
        let config: ModelConfig = toml::from_str(&text).map_err(|e| bad(e.to_string()))?;
        config.validate().map_err(bad)?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), String> {
        if self.name.is_empty() || !self.name.chars().all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c)) {
            return Err(format!("name: {:?} must be non-empty and use only A-Z a-z 0-9 _ - .", self.name));
        }
        if self.max_batch_size == 0 || self.max_batch_size > 4096 {
            return Err(format!("max_batch_size: {} must be between 1 and 4096", self.max_batch_size));
        }
        if self.batching.max_queue_size == 0 {
            return Err("batching.max_queue_size: must be at least 1".into());
        }
        if self.batching.instance_count == 0 || self.batching.instance_count > 64 {
            return Err("batching.instance_count: must be between 1 and 64".into());
        }
        self.version_policy.validate()?;
        self.tensorrt.validate()?;
        if let Some([_, _, max]) = self.tensorrt.batch
            && max < self.max_batch_size
        {
            return Err(format!(
                "tensorrt.batch: its max {max} is below max_batch_size {}; batches that large would fail",
                self.max_batch_size
            ));
        }
        for (i, b) in self.fallback.iter().enumerate() {
            if self.fallback[..i].contains(b) {
                return Err(format!("fallback: {b} is listed twice"));
            }
        }
        let b = &self.batching;
        if b.max_queue_delay_us > 10_000_000 {
            return Err("batching.max_queue_delay_us: must be at most 10 s".into());
        }
        if let Some(p) = b.preferred_batch_sizes.iter().find(|&&p| p == 0 || p > self.max_batch_size) {
            return Err(format!("batching.preferred_batch_sizes: {p} must be between 1 and max_batch_size"));
        }
        if b.priority_levels == 0 || b.priority_levels > 16 {
            return Err("batching.priority_levels: must be between 1 and 16".into());
        }
        if !(1..=b.priority_levels).contains(&b.default_priority_level) {
            return Err("batching.default_priority_level: must be between 1 and priority_levels".into());
        }
        if b.priority_aging_ms == 0 {
            return Err("batching.priority_aging_ms: must be at least 1".into());
        }
        if b.default_timeout_ms == Some(0) {
            return Err("batching.default_timeout_ms: must be at least 1 (omit it for no deadline)".into());
        }
        if b.target_p99_ms.is_some_and(|t| !(t.is_finite() && t > 0.0 && t <= 600_000.0)) {
            return Err("batching.target_p99_ms: must be a positive number of milliseconds".into());
        }
        match (&self.input, &self.output) {
            (Some(input), Some(output)) => {
                let [h, w] = input.crop;
                if h == 0 || w == 0 || h > 8192 || w > 8192 {
                    return Err(format!("input.crop: [{h}, {w}] must be between 1 and 8192"));
                }
                if matches!(input.resize_shorter, Some(0) | Some(8193..)) {
                    return Err("input.resize_shorter: must be between 1 and 8192".into());
                }
                input.scale_offset()?;
                if output.top_k == 0 {
                    return Err("output.top_k: must be at least 1".into());
                }
                Ok(())
            }
            (None, None) => Ok(()),
            (Some(_), None) => Err("output: an image [input] needs an [output] table for /predict".into()),
            (None, Some(_)) => Err("input: an [output] table needs an image [input] table".into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
        name = "m"
        max_batch_size = 4
        [input]
        name = "x"
        crop = [2, 3]
        mean = [1.0, 2.0, 3.0]
        std = [2.0, 2.0, 2.0]
        [output]
        name = "y"
    "#;

    fn parse(text: &str) -> Result<ModelConfig, String> {
        let c: ModelConfig = toml::from_str(text).map_err(|e| e.to_string())?;
        c.validate()?;
        Ok(c)
    }

    #[test]
    fn defaults_and_normalisation() -> Result<(), String> {
        let c = parse(GOOD)?;
        assert_eq!(c.batching.max_queue_delay_us, 2000);
        assert_eq!(c.output.as_ref().map(|o| o.top_k), Some(5));
        let (scale, offset) = c.input.as_ref().ok_or("no input")?.scale_offset()?;
        assert_eq!(scale, [0.5; 3]);
        assert_eq!(offset, [-0.5, -1.0, -1.5]);
        Ok(())
    }

    #[test]
    fn version_policy_selects_versions() -> Result<(), String> {
        let latest2 = VersionPolicy { latest: Some(2), specific: None };
        assert_eq!(latest2.select(&[1, 3, 2])?, vec![3, 2]);
        assert_eq!(VersionPolicy::default().select(&[1, 7, 3])?, vec![7]);
        let specific = VersionPolicy { latest: None, specific: Some(vec![1, 3]) };
        assert_eq!(specific.select(&[1, 2, 3])?, vec![3, 1]);
        assert!(specific.select(&[1, 2]).is_err(), "a missing specific version is an error");
        assert!(VersionPolicy { latest: Some(0), specific: None }.validate().is_err());
        assert!(VersionPolicy { latest: Some(1), specific: Some(vec![1]) }.validate().is_err());
        Ok(())
    }

    #[test]
    fn backends_parse_and_fall_back_in_order() -> Result<(), String> {
        let c = parse("name = \"t\"\nmax_batch_size = 4")?;
        assert_eq!((c.backend, c.fallback.len()), (BackendKind::Onnxruntime, 0));
        let c = parse(
            r#"
            name = "t"
            max_batch_size = 8
            backend = "tensorrt"
            fallback = ["tensorrt", "ort-cuda", "cpu"]
            [tensorrt]
            precision = "int8"
            int8_calibration_table = "calib/table.bin"
            engine_cache_dir = "/var/cache/kiln"
            batch = [1, 4, 8]
            [ort_cuda]
            device_id = 1
            "#,
        )?;
        let order = BackendKind::order(c.backend, &c.fallback);
        assert_eq!(order, [BackendKind::TensorRt, BackendKind::OrtCuda, BackendKind::Onnxruntime]);
        assert_eq!(c.ort_cuda.device_id, 1);
        let trt = c.tensorrt_options(Path::new("/models/t"));
        assert_eq!(trt.int8_calibration_table.as_deref(), Some(Path::new("/models/t/calib/table.bin")));
        assert_eq!(trt.engine_cache_dir.as_deref(), Some(Path::new("/var/cache/kiln")), "absolute paths stay");
        assert_eq!(trt.batch, Some([1, 4, 8]));
        for name in ["cpu", "onnxruntime", "cuda", "tensorrt", "ort-cuda"] {
            let kind = BackendKind::parse(name).ok_or(name)?;
            let toml_name = if name == "onnxruntime" { "cpu" } else { name };
            assert_eq!(kind.name(), toml_name);
            let c = parse(&format!("name = \"t\"\nmax_batch_size = 4\nbackend = \"{name}\""))?;
            assert_eq!(c.backend, kind);
        }
        Ok(())
    }

    #[test]
    fn tensor_only_models_need_no_image_tables() -> Result<(), String> {
        let c = parse("name = \"t\"\nmax_batch_size = 4")?;
        assert!(c.input.is_none() && c.output.is_none());
        Ok(())
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            (GOOD.replace("max_batch_size = 4", "max_batch_size = 0"), "max_batch_size"),
            (GOOD.replace("crop = [2, 3]", "crop = [0, 3]"), "input.crop"),
            (GOOD.replace("name = \"m\"", "name = \"../x\""), "name"),
            (GOOD.replace("std = [2.0, 2.0, 2.0]", "std = [0.0, 2.0, 2.0]"), "input.std"),
            (GOOD.replace("[output]", "[output]\ntop_k = 0"), "output.top_k"),
            (GOOD.replace("[output]\n        name = \"y\"", ""), "output"),
            (GOOD.replace("max_batch_size = 4", "max_batch_size = 4\nmax_batch = 3"), "max_batch"),
            (GOOD.replace("crop = [2, 3]", "crop = [2, 3]\nscale = [1.0, 1.0, 1.0]"), "not both"),
            (GOOD.replace("name = \"x\"", "name = 5"), "name"),
            (format!("{GOOD}\n[batching]\npreferred_batch_sizes = [5]"), "batching.preferred_batch_sizes"),
            (format!("{GOOD}\n[batching]\npriority_levels = 2\ndefault_priority_level = 3"), "default_priority_level"),
            (format!("{GOOD}\n[batching]\ntarget_p99_ms = -1.0"), "batching.target_p99_ms"),
            (format!("{GOOD}\n[batching]\ndefault_timeout_ms = 0"), "batching.default_timeout_ms"),
            (GOOD.replace("max_batch_size = 4", "max_batch_size = 4\nfallback = [\"cpu\", \"cpu\"]"), "fallback"),
            (GOOD.replace("max_batch_size = 4", "max_batch_size = 4\nfallback = [\"gpu\"]"), "fallback"),
            (GOOD.replace("max_batch_size = 4", "max_batch_size = 4\nbackend = \"trt\""), "backend"),
            (format!("{GOOD}\n[tensorrt]\nbatch = [4, 2, 8]"), "tensorrt.batch"),
            (format!("{GOOD}\n[tensorrt]\nbatch = [1, 2, 2]"), "tensorrt.batch"),
            (format!("{GOOD}\n[tensorrt]\nseq = [0, 128, 512]"), "tensorrt.seq"),
            (format!("{GOOD}\n[tensorrt]\nbuilder_optimization_level = 9"), "tensorrt.builder_optimization_level"),
            (format!("{GOOD}\n[tensorrt]\nworkspace_mib = 0"), "tensorrt.workspace_mib"),
            (format!("{GOOD}\n[tensorrt]\nint8_calibration_table = \"c.bin\""), "tensorrt.int8_calibration_table"),
            (format!("{GOOD}\n[tensorrt]\nprecision = \"int4\""), "precision"),
            (format!("{GOOD}\n[tensorrt]\nfp16 = true"), "fp16"),
            (format!("{GOOD}\n[ort_cuda]\nconv_algo_search = \"fastest\""), "conv_algo_search"),
        ];
        for (text, field) in cases {
            match parse(&text) {
                Ok(_) => panic!("accepted config with bad {field}"),
                Err(e) => assert!(e.contains(field), "error {e:?} does not mention {field}"),
            }
        }
    }
}
