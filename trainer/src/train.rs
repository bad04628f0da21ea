//! The training loop: data-parallel over [`Ddp`], AdamW with warm-up + cosine, gradient
//! clipping, FP16 autocast with loss scaling on CUDA, evaluation every epoch, JSONL
//! metrics, curves, and checkpoints that resume bit-identically.
//!
//! Everything random derives from the run's seed: the epoch order and augmentation
//! from `(seed, epoch)`, dropout from `(seed, step, rank)` re-seeded before every step.
//! That is what makes a resumed run equal an uninterrupted one.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

use crate::checkpoint::{self, Meta};
use crate::data::{self, Batch, Dataset, Loader};
pub use crate::data::{DataConfig, SharedDataset, datasets, normalize_of};
use crate::ddp::Ddp;
use crate::eager::Eager;
use crate::error::TrainError;
use crate::log::RunLog;
use crate::models::{BertHead, ModelConfig, Network, Zoo};
use crate::optim::{AdamW, AdamWConfig, CosineSchedule, LossScaler, clip_grad_norm};

/// Where tensors live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum DeviceChoice {
    /// CUDA when libtorch sees a GPU, else CPU.
    Auto,
    Cpu,
    Cuda,
}

/// A run's configuration; saved in every checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FitConfig {
    pub model: ModelConfig,
    pub data: DataConfig,
    pub epochs: u64,
    /// The global batch: summed over all data-parallel ranks.
    pub batch_size: usize,
    pub eval_batch_size: usize,
    pub lr: f64,
    pub min_lr: f64,
    pub warmup_steps: u64,
    pub adamw: AdamWConfig,
    pub clip_grad_norm: Option<f64>,
    /// FP16 autocast with dynamic loss scaling (CUDA only; ignored on CPU).
    pub amp: bool,
    pub seed: u64,
    /// Data-loading threads per rank.
    pub workers: usize,
    pub device: DeviceChoice,
    /// Also checkpoint every this many steps (always at the end of an epoch).
    pub checkpoint_every: Option<u64>,
    /// Stop after this many optimizer steps in total (the schedule still spans all epochs).
    pub max_steps: Option<u64>,
    /// Initial weights (safetensors, checkpoint names; e.g. a pretrained BERT). Variables
    /// the file lacks keep their initialisation.
    pub init_from: Option<PathBuf>,
    /// Log training loss every this many steps.
    pub log_every: u64,
    /// Micro-batches per step on each rank: their gradients accumulate into one update
    /// (less memory per forward; batch-norm statistics are then per micro-batch).
    #[serde(default = "one")]
    pub grad_accum: u32,
}

fn one() -> u32 {
    1
}

impl FitConfig {
    /// A short name of the data, for generated files.
    pub fn data_kind(&self) -> &'static str {
        match self.data {
            DataConfig::FashionMnist { .. } => "fashion-mnist",
            DataConfig::ImageFolder { .. } => "an image folder",
            DataConfig::Text { .. } => "a text-classification file",
        }
    }
}

/// One epoch's results, as logged and kept in checkpoints.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochMetrics {
    pub epoch: u64,
    pub step: u64,
    pub train_loss: f64,
    pub train_accuracy: f64,
    pub eval_loss: f64,
    pub eval_accuracy: f64,
    pub lr: f64,
    pub seconds: f64,
    pub examples_per_second: f64,
}

/// Loss and accuracy over a dataset.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct EvalMetrics {
    pub loss: f64,
    pub accuracy: f64,
    pub examples: u64,
}

/// How `fit` runs, beyond the configuration.
#[derive(Debug, Clone)]
pub struct FitOptions {
    /// Receives `checkpoints/`, `metrics.jsonl`, `curves.svg`.
    pub run_dir: PathBuf,
    /// A run or checkpoint directory to continue from; its configuration wins.
    pub resume: Option<PathBuf>,
    /// With `resume`: train to at least this many epochs (the schedule then spans them).
    pub extend_epochs: Option<u64>,
    pub progress: bool,
}

/// What a finished run leaves behind.
#[derive(Debug, Clone)]
pub struct FitReport {
    pub history: Vec<EpochMetrics>,
    pub steps: u64,
    pub last_checkpoint: Option<PathBuf>,
    /// Each rank's weight fingerprint at the end (all equal, or `fit` fails).
    pub replica_fingerprints: Vec<f64>,
}

/// The model with its variables, on a device.
#[derive(Debug)]
pub struct Built {
    pub vs: VarStore,
    pub model: Zoo,
}

impl Built {
    pub fn new(config: &ModelConfig, device: Device) -> Result<Self, TrainError> {
        let vs = VarStore::new(device);
        let model = Zoo::new(&vs.root(), config)?;
        Ok(Built { vs, model })
    }

    /// All variables sorted by name, so every rank sees the same order.
    pub fn variables(&self) -> Vec<(String, Tensor)> {
        let mut v: Vec<(String, Tensor)> = self.vs.variables().into_iter().collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    pub fn trainable(&self) -> Vec<(String, Tensor)> {
        self.variables().into_iter().filter(|(_, t)| t.requires_grad()).collect()
    }
}

pub fn resolve_device(choice: DeviceChoice, local_rank: usize) -> Result<Device, TrainError> {
    let cuda = tch::Cuda::is_available();
    match choice {
        DeviceChoice::Cpu => Ok(Device::Cpu),
        DeviceChoice::Auto if !cuda => Ok(Device::Cpu),
        DeviceChoice::Cuda if !cuda => {
            Err(TrainError::Config("--device cuda, but libtorch sees no CUDA device".into()))
        }
        DeviceChoice::Auto | DeviceChoice::Cuda => {
            let count = tch::Cuda::device_count().max(1) as usize;
            Ok(Device::Cuda(local_rank % count))
        }
    }
}

/// SplitMix64 finaliser: independent-looking seeds from structured inputs.
pub fn mix(a: u64, b: u64) -> u64 {
    let mut z = a ^ b.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(0x632B_E59B_D9B4_E019);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Trains (or continues) a run. Rank 0 alone writes checkpoints, logs and plots.
pub fn fit(config: FitConfig, options: &FitOptions, ddp: &Ddp) -> Result<FitReport, TrainError> {
    let world = ddp.world();
    let (config, resume_meta, resume_dir) = match &options.resume {
        Some(path) => {
            let dir = checkpoint::resolve(path)?;
            let meta = checkpoint::load_meta(&dir)?;
            // The saved run decides everything that shapes the computation; the caller may
            // only extend it.
            let mut saved = meta.config.clone();
            if let Some(e) = options.extend_epochs {
                saved.epochs = saved.epochs.max(e);
            }
            saved.max_steps = config.max_steps;
            saved.workers = config.workers;
            (saved, Some(meta), Some(dir))
        }
        None => (config, None, None),
    };
    validate(&config, world.size)?;
    let device = resolve_device(config.device, local_rank())?;
    let (train_set, eval_set) = datasets(&config.data, &config.model)?;
    let mut config = config;
    if config.model.num_classes == 0 {
        // "From the data": the class count is only known once the data is open.
        let n = train_set.classes().len() as i64;
        config.model.num_classes = n;
        if let Some(bert) = &mut config.model.bert
            && let BertHead::Classifier { num_labels } = &mut bert.head
        {
            *num_labels = n;
        }
    }
    config.model.validate()?;
    // The initialisation is part of the run: a re-run with the same seed is the same run.
    tch::manual_seed(mix(config.seed, u64::MAX) as i64);
    let mut built = Built::new(&config.model, device)?;
    if let Some(init) = &config.init_from
        && resume_dir.is_none()
    {
        checkpoint::load_initial(init, &built.vs)?;
    }
    if let (Some(_), Some(dir)) = (&resume_meta, &resume_dir) {
        // Before the optimizer takes the parameters into its flat buffer.
        checkpoint::load_weights(dir, &mut built.vs)?;
    }
    let mut optimizer = AdamW::new(built.trainable(), config.adamw.clone())?;
    let mut scaler = LossScaler::default();
    let mut history = Vec::new();
    let (mut epoch, mut step, mut step_in_epoch) = (0, 0, 0);
    if let (Some(meta), Some(dir)) = (&resume_meta, &resume_dir) {
        let state = checkpoint::load_optimizer(dir)?;
        let state: Vec<(String, Tensor)> =
            state.into_iter().map(|(n, t)| t.f_to_device(device).map(|t| (n, t))).collect::<Result<_, _>>()?;
        optimizer.load_state(&state, meta.step)?;
        scaler = meta.scaler.clone();
        history = meta.history.clone();
        (epoch, step, step_in_epoch) = (meta.epoch, meta.step, meta.step_in_epoch);
    } else {
        // Replicas must start identical: rank 0's initialisation wins.
        let vars: Vec<Tensor> = built.variables().into_iter().map(|(_, t)| t).collect();
        ddp.broadcast(&vars)?;
    }

    let steps_per_epoch = (train_set.len() / config.batch_size) as u64;
    if steps_per_epoch == 0 {
        return Err(TrainError::Config(format!(
            "the training set has {} examples, fewer than one batch of {}",
            train_set.len(),
            config.batch_size
        )));
    }
    let schedule = CosineSchedule {
        base_lr: config.lr,
        min_lr: config.min_lr,
        warmup_steps: config.warmup_steps,
        total_steps: steps_per_epoch * config.epochs,
    };
    let classes = train_set.classes().to_vec();
    let mut log = if ddp.is_root() { Some(RunLog::open(&options.run_dir, options.progress)?) } else { None };
    let params: Vec<Tensor> = built.trainable().into_iter().map(|(_, t)| t).collect();
    let mut last_checkpoint = None;
    // A resumed run starts at a step that is already on disk.
    let mut saved_step = resume_meta.as_ref().map(|m| m.step);
    let cuda_amp = config.amp && device.is_cuda();

    'epochs: while epoch < config.epochs {
        let started = Instant::now();
        let order = data::epoch_order(train_set.len(), config.seed, epoch, true);
        let mut steps = data::shard_batches(&order, config.batch_size, world.rank, world.size, true);
        let skip = step_in_epoch as usize;
        steps.drain(..skip.min(steps.len()));
        let augment = Some(mix(config.seed, epoch));
        let loader = Loader::new(Arc::clone(&train_set), steps, augment, config.workers);
        if let Some(log) = &mut log {
            log.start_epoch(epoch, steps_per_epoch, step_in_epoch);
        }
        let (mut loss_sum, mut correct, mut seen) = (0.0f64, 0.0f64, 0.0f64);
        let (mut window_loss, mut window_n) = (0.0f64, 0.0f64);
        for batch in loader {
            if config.max_steps.is_some_and(|m| step >= m) {
                break 'epochs;
            }
            let batch = batch?;
            tch::manual_seed(mix(mix(config.seed, step), world.rank as u64) as i64);
            let lr = schedule.lr(step);
            let (loss, hits, n) =
                train_step(&built, &mut optimizer, &mut scaler, &params, ddp, &batch, lr, &config, cuda_amp)?;
            step += 1;
            step_in_epoch += 1;
            loss_sum += loss * n;
            correct += hits;
            seen += n;
            window_loss += loss * n;
            window_n += n;
            if step % config.log_every.max(1) == 0 {
                let totals = ddp.sum_f64(&[window_loss, window_n])?;
                if let Some(log) = &mut log {
                    log.step(epoch, step, totals[0] / totals[1].max(1.0), lr)?;
                }
                (window_loss, window_n) = (0.0, 0.0);
            }
            if let Some(log) = &mut log {
                log.tick();
            }
            if config.checkpoint_every.is_some_and(|every| step % every == 0) && step_in_epoch < steps_per_epoch {
                sync_buffers(&built, ddp)?;
                let meta = meta_of(&config, &classes, epoch, step, step_in_epoch, &scaler, world.size, &history);
                last_checkpoint = save_on_root(ddp, &options.run_dir, &built, &optimizer, &meta)?.or(last_checkpoint);
                saved_step = Some(step);
            }
        }
        let totals = ddp.sum_f64(&[loss_sum, correct, seen])?;
        sync_buffers(&built, ddp)?;
        let eval = evaluate(&built, &eval_set, config.eval_batch_size, ddp, config.workers, cuda_amp)?;
        let seconds = started.elapsed().as_secs_f64();
        let metrics = EpochMetrics {
            epoch,
            step,
            train_loss: totals[0] / totals[2].max(1.0),
            train_accuracy: totals[1] / totals[2].max(1.0),
            eval_loss: eval.loss,
            eval_accuracy: eval.accuracy,
            lr: schedule.lr(step.saturating_sub(1)),
            seconds,
            examples_per_second: totals[2] / seconds.max(1e-9),
        };
        history.push(metrics.clone());
        epoch += 1;
        step_in_epoch = 0;
        if let Some(log) = &mut log {
            log.epoch(&metrics, &history)?;
        }
        let meta = meta_of(&config, &classes, epoch, step, 0, &scaler, world.size, &history);
        last_checkpoint = save_on_root(ddp, &options.run_dir, &built, &optimizer, &meta)?.or(last_checkpoint);
        saved_step = Some(step);
    }
    sync_buffers(&built, ddp)?;
    if config.max_steps.is_some_and(|m| step >= m) && step_in_epoch > 0 && saved_step != Some(step) {
        let meta = meta_of(&config, &classes, epoch, step, step_in_epoch, &scaler, world.size, &history);
        last_checkpoint = save_on_root(ddp, &options.run_dir, &built, &optimizer, &meta)?.or(last_checkpoint);
    }
    let replica_fingerprints = replica_fingerprints(&built, ddp)?;
    if replica_fingerprints.iter().any(|f| f.to_bits() != replica_fingerprints[0].to_bits()) {
        return Err(TrainError::Distributed(format!(
            "the replicas diverged: weight fingerprints {replica_fingerprints:?}"
        )));
    }
    Ok(FitReport { history, steps: step, last_checkpoint, replica_fingerprints })
}

/// Batch-norm running statistics are updated from each rank's own shard and never
/// averaged; rank 0's are taken (as PyTorch DDP's `broadcast_buffers`) before anything
/// reads them: evaluation, checkpoints, the replica check.
fn sync_buffers(built: &Built, ddp: &Ddp) -> Result<(), TrainError> {
    if ddp.world().size == 1 {
        return Ok(());
    }
    let buffers: Vec<Tensor> =
        built.variables().into_iter().filter(|(_, t)| !t.requires_grad()).map(|(_, t)| t).collect();
    ddp.broadcast(&buffers)
}

/// One number per rank summarising its weights (every variable, in name order), so
/// ranks can check they still hold the same model. Identical weights give identical bits.
fn replica_fingerprints(built: &Built, ddp: &Ddp) -> Result<Vec<f64>, TrainError> {
    let mut fp = 0.0f64;
    tch::no_grad(|| -> Result<(), TrainError> {
        for (i, (_, t)) in built.variables().iter().enumerate() {
            let t = t.f_to_kind(Kind::Double)?;
            // Position-weighted, so swapped or sign-flipped tensors do not cancel out.
            let w = Tensor::f_arange(t.numel() as i64, (Kind::Double, t.device()))?.f_add_scalar(1.0 + i as f64)?;
            fp += t.f_flatten(0, -1)?.f_dot(&w)?.f_double_value(&[])?;
        }
        Ok(())
    })?;
    let world = ddp.world();
    let mut slots = vec![0.0; world.size];
    slots[world.rank] = fp;
    ddp.sum_f64(&slots)
}

fn validate(config: &FitConfig, world: usize) -> Result<(), TrainError> {
    if config.batch_size == 0 || config.eval_batch_size == 0 {
        return Err(TrainError::Config("batch sizes must be positive".into()));
    }
    if config.checkpoint_every == Some(0) {
        return Err(TrainError::Config("checkpoint_every must be at least 1".into()));
    }
    if config.clip_grad_norm.is_some_and(|c| !(c > 0.0 && c.is_finite())) {
        return Err(TrainError::Config("clip_grad_norm must be a positive number".into()));
    }
    if config.grad_accum == 0 {
        return Err(TrainError::Config("grad_accum must be at least 1".into()));
    }
    if !config.batch_size.is_multiple_of(world) {
        // Unequal shards would weight examples unequally in the averaged gradient.
        return Err(TrainError::Config(format!(
            "the global batch {} must be divisible by the {world} data-parallel ranks",
            config.batch_size
        )));
    }
    if !(config.lr > 0.0 && config.lr.is_finite() && config.min_lr >= 0.0 && config.min_lr.is_finite()) {
        return Err(TrainError::Config("lr must be positive and min_lr non-negative".into()));
    }
    Ok(())
}

/// One optimizer step; returns the local mean loss, correct count and batch size.
#[allow(clippy::too_many_arguments)]
fn train_step(
    built: &Built,
    optimizer: &mut AdamW,
    scaler: &mut LossScaler,
    params: &[Tensor],
    ddp: &Ddp,
    batch: &Batch,
    lr: f64,
    config: &FitConfig,
    cuda_amp: bool,
) -> Result<(f64, f64, f64), TrainError> {
    let device = built.vs.device();
    let inputs: Vec<Tensor> = batch.inputs.iter().map(|t| t.f_to_device(device)).collect::<Result<_, _>>()?;
    let labels = batch.labels.f_to_device(device)?;
    let n = labels.size()[0];
    let micro = (config.grad_accum.max(1) as i64).min(n.max(1));
    optimizer.zero_grad();
    let (mut loss_sum, mut hits) = (0.0f64, 0.0f64);
    // Micro-batches accumulate into the gradient, each weighted by its share of the batch,
    // so the result is the gradient of the whole batch's mean loss.
    for k in 0..micro {
        let (start, len) = (k * n / micro, (k + 1) * n / micro - k * n / micro);
        if len == 0 {
            continue;
        }
        let part: Vec<Tensor> = inputs.iter().map(|t| t.f_narrow(0, start, len)).collect::<Result<_, _>>()?;
        let part_labels = labels.f_narrow(0, start, len)?;
        let logits = tch::autocast(cuda_amp, || built.model.forward(&mut Eager::train(), &part))?;
        let logits = first(logits)?.f_to_kind(Kind::Float)?;
        let loss = cross_entropy(&logits, &part_labels)?;
        let weight = len as f64 / n as f64 * if cuda_amp { scaler.scale } else { 1.0 };
        loss.f_mul_scalar(weight)?.backward();
        loss_sum += loss.f_double_value(&[])? * len as f64;
        hits += logits.f_argmax(-1, false)?.f_eq_tensor(&part_labels)?.f_sum(Kind::Float)?.f_double_value(&[])?;
    }
    ddp.average_gradients(params)?;
    let finite = if cuda_amp { scaler.unscale_and_update(params.iter())? } else { true };
    if finite {
        if let Some(max) = config.clip_grad_norm {
            clip_grad_norm(params.iter(), max)?;
        }
        optimizer.step(lr)?;
    }
    Ok((loss_sum / n.max(1) as f64, hits, n as f64))
}

fn cross_entropy(logits: &Tensor, labels: &Tensor) -> Result<Tensor, TrainError> {
    Ok(logits.f_cross_entropy_loss(labels, None::<Tensor>, tch::Reduction::Mean, -100, 0.0)?)
}

fn first(mut outputs: Vec<Tensor>) -> Result<Tensor, TrainError> {
    if outputs.is_empty() {
        return Err(TrainError::Shape("the model produced no output".into()));
    }
    Ok(outputs.swap_remove(0))
}

/// Mean loss and accuracy over `set`, sharded across ranks and summed.
pub fn evaluate(
    built: &Built,
    set: &Arc<dyn Dataset>,
    batch_size: usize,
    ddp: &Ddp,
    workers: usize,
    cuda_amp: bool,
) -> Result<EvalMetrics, TrainError> {
    let world = ddp.world();
    let order = data::epoch_order(set.len(), 0, 0, false);
    let steps = data::shard_batches(&order, batch_size * world.size, world.rank, world.size, false);
    let device = built.vs.device();
    let (mut loss_sum, mut correct, mut seen) = (0.0f64, 0.0f64, 0.0f64);
    tch::no_grad(|| -> Result<(), TrainError> {
        for batch in Loader::new(Arc::clone(set), steps, None, workers) {
            let batch = batch?;
            // A rank's share of a short last batch can be empty.
            if batch.labels.size().first().is_none_or(|&n| n == 0) {
                continue;
            }
            let inputs: Vec<Tensor> = batch.inputs.iter().map(|t| t.f_to_device(device)).collect::<Result<_, _>>()?;
            let labels = batch.labels.f_to_device(device)?;
            let logits = tch::autocast(cuda_amp, || built.model.forward(&mut Eager::eval(), &inputs))?;
            let logits = first(logits)?.f_to_kind(Kind::Float)?;
            let n = labels.size()[0] as f64;
            loss_sum += cross_entropy(&logits, &labels)?.f_double_value(&[])? * n;
            correct += logits.f_argmax(-1, false)?.f_eq_tensor(&labels)?.f_sum(Kind::Float)?.f_double_value(&[])?;
            seen += n;
        }
        Ok(())
    })?;
    let t = ddp.sum_f64(&[loss_sum, correct, seen])?;
    Ok(EvalMetrics { loss: t[0] / t[2].max(1.0), accuracy: t[1] / t[2].max(1.0), examples: t[2] as u64 })
}

#[allow(clippy::too_many_arguments)]
fn meta_of(
    config: &FitConfig,
    classes: &[String],
    epoch: u64,
    step: u64,
    step_in_epoch: u64,
    scaler: &LossScaler,
    world_size: usize,
    history: &[EpochMetrics],
) -> Meta {
    Meta {
        format_version: checkpoint::FORMAT_VERSION,
        config: config.clone(),
        classes: classes.to_vec(),
        epoch,
        step,
        step_in_epoch,
        seed: config.seed,
        scaler: scaler.clone(),
        world_size,
        history: history.to_vec(),
    }
}

fn save_on_root(
    ddp: &Ddp,
    run_dir: &Path,
    built: &Built,
    optimizer: &AdamW,
    meta: &Meta,
) -> Result<Option<PathBuf>, TrainError> {
    if !ddp.is_root() {
        return Ok(None);
    }
    checkpoint::save(run_dir, &built.vs, &optimizer.state(), meta).map(Some)
}

/// The local rank on this host (mpirun's environment), for picking a GPU.
pub fn local_rank() -> usize {
    ["OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID"]
        .iter()
        .find_map(|k| std::env::var(k).ok()?.parse().ok())
        .unwrap_or(0)
}
