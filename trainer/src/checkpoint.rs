//! Checkpoints: `model.safetensors` (parameters and batch-norm buffers under their
//! checkpoint names), `optimizer.safetensors` (AdamW moments) and `meta.json` (the run's
//! configuration, progress, RNG seed and metrics), in one directory per save. A
//! `latest.json` beside them names the newest, so `--resume RUN_DIR` works.
//!
//! Files are written under a temporary name and renamed, so an interrupted save never
//! leaves a checkpoint that looks complete but is not.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tch::Tensor;
use tch::nn::VarStore;

use crate::error::TrainError;
use crate::optim::LossScaler;
use crate::train::{EpochMetrics, FitConfig};

/// Bumped when the layout changes incompatibly.
pub const FORMAT_VERSION: u32 = 1;

/// Everything about a run that is not a tensor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Meta {
    pub format_version: u32,
    pub config: FitConfig,
    /// Class names, in class-id order.
    pub classes: Vec<String>,
    /// Epochs fully completed.
    pub epoch: u64,
    /// Optimizer steps taken in total (the schedule's position).
    pub step: u64,
    /// Steps already taken inside `epoch` (non-zero for a mid-epoch save).
    pub step_in_epoch: u64,
    /// The run's base seed; every per-step seed derives from it.
    pub seed: u64,
    /// Mixed-precision loss scaler state.
    pub scaler: LossScaler,
    pub world_size: usize,
    pub history: Vec<EpochMetrics>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Latest {
    checkpoint: String,
}

/// Writes a checkpoint into `run_dir/checkpoints/step-XXXXXXXX/` and points `latest.json` at it.
pub fn save(run_dir: &Path, vs: &VarStore, optimizer: &[(String, Tensor)], meta: &Meta) -> Result<PathBuf, TrainError> {
    let name = format!("step-{:08}", meta.step);
    let root = run_dir.join("checkpoints");
    let dir = root.join(&name);
    let tmp = root.join(format!(".{name}.partial"));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| TrainError::io(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| TrainError::io(&tmp, e))?;
    let ckpt_err = |message: String| TrainError::Checkpoint { path: dir.clone(), message };
    tch::no_grad(|| vs.save(tmp.join("model.safetensors"))).map_err(|e| ckpt_err(format!("saving weights: {e}")))?;
    let named: Vec<(&str, &Tensor)> = optimizer.iter().map(|(n, t)| (n.as_str(), t)).collect();
    Tensor::write_safetensors(&named, tmp.join("optimizer.safetensors"))
        .map_err(|e| ckpt_err(format!("saving optimizer state: {e}")))?;
    let json = serde_json::to_vec_pretty(meta).map_err(|e| ckpt_err(format!("encoding meta.json: {e}")))?;
    std::fs::write(tmp.join("meta.json"), json).map_err(|e| TrainError::io(tmp.join("meta.json"), e))?;
    // Replacing a checkpoint of the same step: move the old one aside first, so that the
    // directory latest.json names exists at every moment.
    let old = root.join(format!(".{name}.old"));
    if dir.exists() {
        if old.exists() {
            std::fs::remove_dir_all(&old).map_err(|e| TrainError::io(&old, e))?;
        }
        std::fs::rename(&dir, &old).map_err(|e| TrainError::io(&dir, e))?;
    }
    std::fs::rename(&tmp, &dir).map_err(|e| TrainError::io(&dir, e))?;
    if old.exists() {
        std::fs::remove_dir_all(&old).map_err(|e| TrainError::io(&old, e))?;
    }
    let latest = serde_json::to_vec(&Latest { checkpoint: name }).map_err(|e| ckpt_err(e.to_string()))?;
    let latest_tmp = root.join(".latest.json.partial");
    std::fs::write(&latest_tmp, latest).map_err(|e| TrainError::io(&latest_tmp, e))?;
    std::fs::rename(&latest_tmp, root.join("latest.json")).map_err(|e| TrainError::io(root.join("latest.json"), e))?;
    Ok(dir)
}

/// Resolves a run directory (via `checkpoints/latest.json`) or a checkpoint directory.
pub fn resolve(path: &Path) -> Result<PathBuf, TrainError> {
    if path.join("meta.json").is_file() {
        return Ok(path.to_path_buf());
    }
    let latest = path.join("checkpoints").join("latest.json");
    let text = std::fs::read(&latest).map_err(|e| TrainError::Checkpoint {
        path: path.to_path_buf(),
        message: format!("neither a checkpoint (no meta.json) nor a run directory ({}: {e})", latest.display()),
    })?;
    let l: Latest = serde_json::from_slice(&text)
        .map_err(|e| TrainError::Checkpoint { path: latest.clone(), message: format!("bad latest.json: {e}") })?;
    let mut parts = std::path::Path::new(&l.checkpoint).components();
    if !matches!((parts.next(), parts.next()), (Some(std::path::Component::Normal(_)), None)) {
        return Err(TrainError::Checkpoint {
            path: latest,
            message: format!("bad checkpoint name {:?}", l.checkpoint),
        });
    }
    let dir = path.join("checkpoints").join(&l.checkpoint);
    if !dir.join("meta.json").is_file() {
        return Err(TrainError::Checkpoint { path: dir, message: "latest.json names a missing checkpoint".into() });
    }
    Ok(dir)
}

/// Reads `meta.json` of a checkpoint directory.
pub fn load_meta(dir: &Path) -> Result<Meta, TrainError> {
    let path = dir.join("meta.json");
    let text = std::fs::read(&path).map_err(|e| TrainError::io(&path, e))?;
    let meta: Meta = serde_json::from_slice(&text)
        .map_err(|e| TrainError::Checkpoint { path: path.clone(), message: format!("bad meta.json: {e}") })?;
    if meta.format_version != FORMAT_VERSION {
        return Err(TrainError::Checkpoint {
            path,
            message: format!("format version {} (this kiln-train reads {FORMAT_VERSION})", meta.format_version),
        });
    }
    Ok(meta)
}

/// Loads the weights into `vs` (every variable of `vs` must be in the file).
pub fn load_weights(dir: &Path, vs: &mut VarStore) -> Result<(), TrainError> {
    let path = dir.join("model.safetensors");
    vs.load(&path).map_err(|e| TrainError::Checkpoint { path, message: format!("loading weights: {e}") })
}

/// Initial weights for a new run (e.g. a pretrained encoder): every tensor of the file
/// whose name and shape match a variable is copied in (converted to the variable's
/// type); variables the file lacks keep their initialisation and are listed in the log.
/// A file that matches nothing is an error: it was meant for another model.
pub fn load_initial(path: &Path, vs: &VarStore) -> Result<(), TrainError> {
    let err = |message: String| TrainError::Checkpoint { path: path.to_path_buf(), message };
    let file = Tensor::read_safetensors(path).map_err(|e| err(format!("initial weights: {e}")))?;
    let file: std::collections::HashMap<String, Tensor> = file.into_iter().collect();
    let mut missing = Vec::new();
    let mut loaded = 0usize;
    tch::no_grad(|| -> Result<(), TrainError> {
        for (name, mut var) in vs.variables() {
            match file.get(&name) {
                Some(t) if t.size() == var.size() => {
                    var.f_copy_(t)?;
                    loaded += 1;
                }
                Some(t) => {
                    return Err(err(format!(
                        "`{name}` has shape {:?} in the file, {:?} in the model",
                        t.size(),
                        var.size()
                    )));
                }
                None => missing.push(name),
            }
        }
        Ok(())
    })?;
    if loaded == 0 {
        return Err(err("no tensor of the file matches a variable of the model".into()));
    }
    if !missing.is_empty() {
        missing.sort();
        tracing::info!("initial weights: {loaded} tensors loaded; kept the initialisation of {missing:?}");
    }
    Ok(())
}

/// Reads the optimizer state saved by [`save`].
pub fn load_optimizer(dir: &Path) -> Result<Vec<(String, Tensor)>, TrainError> {
    let path = dir.join("optimizer.safetensors");
    Tensor::read_safetensors(&path)
        .map_err(|e| TrainError::Checkpoint { path, message: format!("loading optimizer state: {e}") })
}
