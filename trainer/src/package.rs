//! `kiln-train export`: a checkpoint becomes a model directory `kiln serve` picks up —
//! `models/<name>/<version>/model.onnx`, `models/<name>/config.toml` and `labels.txt` —
//! and the ONNX file is checked in ONNX Runtime against the libtorch forward pass.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use kiln_engine::{Backend, OrtBackend, OrtOptions, OrtRuntime, TensorData};
use tch::{Device, Kind, Tensor};

use crate::checkpoint;
use crate::eager::Eager;
use crate::error::TrainError;
use crate::models::{Arch, Dim, ElemKind, Network};
use crate::train::{Built, normalize_of};

/// How to export.
#[derive(Debug, Clone)]
pub struct ExportOptions {
    pub opset: i64,
    /// Replace an existing `config.toml` / `labels.txt`.
    pub force: bool,
    /// ONNX Runtime library for the parity check; `None` skips it.
    pub ort_library: Option<PathBuf>,
    /// Largest batch the served model accepts (`max_batch_size`).
    pub max_batch_size: usize,
}

/// What an export wrote and measured.
#[derive(Debug, Clone)]
pub struct ExportReport {
    pub onnx: PathBuf,
    pub config: Option<PathBuf>,
    /// Largest |ONNX Runtime − libtorch| over the checked batches, if checked.
    pub max_abs_diff: Option<f64>,
}

/// Tolerance of the parity check (FP32).
pub const PARITY_TOLERANCE: f64 = 1e-4;

/// Exports the checkpoint at `checkpoint` (a run or checkpoint directory) to `onnx_path`.
pub fn export(checkpoint: &Path, onnx_path: &Path, options: &ExportOptions) -> Result<ExportReport, TrainError> {
    let dir = checkpoint::resolve(checkpoint)?;
    let meta = checkpoint::load_meta(&dir)?;
    let mut built = Built::new(&meta.config.model, Device::Cpu)?;
    checkpoint::load_weights(&dir, &mut built.vs)?;
    if let Some(parent) = onnx_path.parent() {
        std::fs::create_dir_all(parent).map_err(|e| TrainError::io(parent, e))?;
    }
    // Written aside and checked first: a failed export must not leave a model that
    // kiln serve would load.
    let partial = onnx_path.with_extension("onnx.partial");
    crate::export::export_to_file(&built.model, &partial, options.opset)?;
    let max_abs_diff = match &options.ort_library {
        Some(lib) => match verify(&built, &partial, lib) {
            Ok(d) => Some(d),
            Err(e) => {
                let _ = std::fs::remove_file(&partial);
                return Err(e);
            }
        },
        None => None,
    };
    if let Some(diff) = max_abs_diff
        && diff > PARITY_TOLERANCE
    {
        let _ = std::fs::remove_file(&partial);
        return Err(TrainError::Export(format!(
            "ONNX Runtime disagrees with libtorch by {diff:.3e} (> {PARITY_TOLERANCE:e}) on {}",
            onnx_path.display()
        )));
    }
    std::fs::rename(&partial, onnx_path).map_err(|e| TrainError::io(onnx_path, e))?;
    let config = write_serving_files(onnx_path, &meta, &built.model, options)?;
    Ok(ExportReport { onnx: onnx_path.to_path_buf(), config, max_abs_diff })
}

/// `models/<name>/<version>/model.onnx` → the model directory and its name.
fn model_dir(onnx_path: &Path) -> Option<(&Path, String)> {
    let version_dir = onnx_path.parent()?;
    version_dir.file_name()?.to_str()?.parse::<u64>().ok()?;
    let model_dir = version_dir.parent()?;
    let name = model_dir.file_name()?.to_str()?.to_string();
    Some((model_dir, name))
}

fn write_serving_files(
    onnx_path: &Path,
    meta: &checkpoint::Meta,
    net: &impl Network,
    options: &ExportOptions,
) -> Result<Option<PathBuf>, TrainError> {
    let Some((dir, name)) = model_dir(onnx_path) else {
        tracing::warn!("{} is not models/<name>/<version>/model.onnx: no config.toml written", onnx_path.display());
        return Ok(None);
    };
    let config_path = dir.join("config.toml");
    if config_path.exists() && !options.force {
        tracing::info!("keeping the existing {} (--force replaces it)", config_path.display());
        return Ok(Some(config_path));
    }
    let model = &meta.config.model;
    let mut toml = String::new();
    let w = |t: &mut String, line: String| {
        let _ = writeln!(t, "{line}");
    };
    w(&mut toml, format!("# Written by kiln-train export from {} (step {}).", meta.config.data_kind(), meta.step));
    w(&mut toml, format!("name = {name:?}"));
    w(&mut toml, "backend = \"onnxruntime\"".into());
    w(&mut toml, format!("max_batch_size = {}", options.max_batch_size));
    let image_model = model.arch != Arch::Bert;
    if image_model && let Some(norm) = normalize_of(&meta.config.data) {
        let input = net.inputs().into_iter().next().map(|i| i.name).unwrap_or_else(|| "image".into());
        let gray = model.in_channels == 1;
        let triple = |v: &[f32]| -> String {
            let pick = |c: usize| v.get(c).or(v.first()).copied().unwrap_or(0.0);
            format!("[{}, {}, {}]", pick(0), pick(1), pick(2))
        };
        let size = model.image_size;
        // Fashion-MNIST is trained on whole 28×28 images; photo sets on centre crops.
        let resize = if matches!(meta.config.data, crate::train::DataConfig::FashionMnist { .. }) {
            size
        } else {
            size * 256 / 224
        };
        w(&mut toml, String::new());
        w(&mut toml, "[input]".into());
        w(&mut toml, format!("name = {input:?}"));
        w(&mut toml, format!("resize_shorter = {resize}"));
        w(&mut toml, format!("crop = [{size}, {size}]"));
        w(&mut toml, format!("color = \"{}\"", if gray { "gray" } else { "rgb" }));
        w(&mut toml, "layout = \"nchw\"".into());
        w(&mut toml, format!("mean = {}", triple(&norm.mean)));
        w(&mut toml, format!("std = {}", triple(&norm.std)));
        let output = net.outputs().into_iter().next().map(|o| o.name).unwrap_or_else(|| "logits".into());
        w(&mut toml, String::new());
        w(&mut toml, "[output]".into());
        w(&mut toml, format!("name = {output:?}"));
        w(&mut toml, "softmax = true".into());
        w(&mut toml, format!("top_k = {}", meta.classes.len().clamp(1, 5)));
        w(&mut toml, "labels = \"labels.txt\"".into());
        let labels = dir.join("labels.txt");
        let text: String = meta.classes.iter().map(|c| format!("{c}\n")).collect();
        std::fs::write(&labels, text).map_err(|e| TrainError::io(&labels, e))?;
    }
    std::fs::write(&config_path, toml).map_err(|e| TrainError::io(&config_path, e))?;
    Ok(Some(config_path))
}

/// Runs random inputs of several batch sizes (and sequence lengths) through both ONNX
/// Runtime and libtorch; returns the largest absolute difference.
pub fn verify(built: &Built, onnx_path: &Path, ort_library: &Path) -> Result<f64, TrainError> {
    let runtime = OrtRuntime::load(ort_library).map_err(|e| TrainError::Export(format!("ONNX Runtime: {e}")))?;
    let mut session = OrtBackend::load(&runtime, onnx_path, &OrtOptions::default())
        .map_err(|e| TrainError::Export(format!("ONNX Runtime rejected the export: {e}")))?;
    let specs = built.model.inputs();
    // Random token ids must exist in the vocabulary.
    let vocab = built.model.as_bert().map(|b| b.config().vocab_size).unwrap_or(1000).clamp(2, 1000);
    let mut worst = 0.0f64;
    tch::manual_seed(7);
    for (batch, seq) in [(1i64, 5i64), (3, 11), (8, 16)] {
        let mut torch_inputs = Vec::new();
        let mut ort_inputs = Vec::new();
        for spec in &specs {
            let shape: Vec<i64> = spec
                .dims
                .iter()
                .enumerate()
                .map(|(i, d)| match d {
                    Dim::Fixed(n) => *n,
                    Dim::Dynamic(_) if i == 0 => batch,
                    Dim::Dynamic(_) => seq,
                })
                .collect();
            let t = match (spec.kind, spec.name.as_str()) {
                (ElemKind::F32, _) => Tensor::f_randn(shape.as_slice(), (Kind::Float, Device::Cpu))?,
                // A padded tail exercises the attention mask.
                (ElemKind::I64, "attention_mask") => {
                    let m = Tensor::f_ones(shape.as_slice(), (Kind::Int64, Device::Cpu))?;
                    let len = shape.get(1).copied().unwrap_or(0);
                    if len > 2 {
                        let _ = m.f_narrow(1, len - 2, 2)?.f_fill_(0)?;
                    }
                    m
                }
                (ElemKind::I64, "token_type_ids") => Tensor::f_zeros(shape.as_slice(), (Kind::Int64, Device::Cpu))?,
                (ElemKind::I64, _) => Tensor::f_randint_low(1, vocab, shape.as_slice(), (Kind::Int64, Device::Cpu))?,
            };
            ort_inputs.push(to_engine(&t, spec.kind)?);
            torch_inputs.push(t);
        }
        let expected = tch::no_grad(|| built.model.forward(&mut Eager::eval(), &torch_inputs))?;
        let got = session.run(&ort_inputs).map_err(|e| TrainError::Export(format!("ONNX Runtime run: {e}")))?;
        if got.len() != expected.len() {
            return Err(TrainError::Export(format!(
                "{} outputs from ONNX Runtime, {} from libtorch",
                got.len(),
                expected.len()
            )));
        }
        for (e, g) in expected.iter().zip(&got) {
            let e = Vec::<f32>::try_from(&e.f_contiguous()?.f_view([-1])?)?;
            let TensorData::F32(g) = g.data() else {
                return Err(TrainError::Export("ONNX Runtime returned a non-f32 output".into()));
            };
            if e.len() != g.len() {
                return Err(TrainError::Export(format!("output sizes differ: {} vs {}", e.len(), g.len())));
            }
            for (a, b) in e.iter().zip(g) {
                let d = f64::from((a - b).abs());
                if d.is_nan() {
                    return Err(TrainError::Export("NaN in an output of the parity check".into()));
                }
                worst = worst.max(d);
            }
        }
    }
    Ok(worst)
}

fn to_engine(t: &Tensor, kind: ElemKind) -> Result<kiln_engine::Tensor, TrainError> {
    let shape: Vec<usize> = t.size().iter().map(|&d| d as usize).collect();
    let flat = t.f_contiguous()?.f_view([-1])?;
    let data = match kind {
        ElemKind::F32 => TensorData::F32(Vec::<f32>::try_from(&flat)?),
        ElemKind::I64 => TensorData::I64(Vec::<i64>::try_from(&flat)?),
    };
    kiln_engine::Tensor::new(shape, data).map_err(|e| TrainError::Export(e.to_string()))
}
