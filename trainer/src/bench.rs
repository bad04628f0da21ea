//! `kiln-train bench-step`: the time of one training step (forward, cross-entropy,
//! backward, AdamW) on synthetic data, measured the way the PyTorch comparison script
//! (`benches/scripts/train_step.py`) measures it, so the two are comparable.

use std::time::Instant;

use serde::Serialize;
use tch::{Device, Kind, Tensor};

use crate::ddp::Ddp;
use crate::eager::Eager;
use crate::error::TrainError;
use crate::models::{ModelConfig, Network};
use crate::optim::{AdamW, AdamWConfig, LossScaler};
use crate::train::Built;

/// What to measure.
#[derive(Debug, Clone)]
pub struct StepBench {
    pub model: ModelConfig,
    /// The global batch; each data-parallel rank takes `batch_size / world`.
    pub batch_size: i64,
    pub warmup: usize,
    pub steps: usize,
    pub device: Device,
    /// FP16 autocast + loss scaling (CUDA only).
    pub amp: bool,
}

/// Per-step wall times in milliseconds and their summary.
#[derive(Debug, Clone, Serialize)]
pub struct StepReport {
    pub implementation: &'static str,
    pub model: String,
    pub batch_size: i64,
    pub image_size: i64,
    pub device: String,
    pub amp: bool,
    pub threads: i32,
    pub world_size: usize,
    pub steps_ms: Vec<f64>,
    pub median_ms: f64,
    pub mean_ms: f64,
    pub images_per_second: f64,
}

/// Under mpirun every rank runs this; gradients are averaged as in training, and the
/// report (valid on every rank) counts the global batch.
pub fn run(b: &StepBench, ddp: &Ddp) -> Result<StepReport, TrainError> {
    let world = ddp.world().size;
    if b.batch_size % world as i64 != 0 {
        return Err(TrainError::Config(format!("batch {} is not divisible by {world} ranks", b.batch_size)));
    }
    let local_batch = b.batch_size / world as i64;
    let built = Built::new(&b.model, b.device)?;
    let mut opt = AdamW::new(built.trainable(), AdamWConfig { weight_decay: 0.05, ..AdamWConfig::default() })?;
    let params: Vec<Tensor> = built.trainable().into_iter().map(|(_, t)| t).collect();
    let mut scaler = LossScaler::default();
    let spec = built.model.inputs();
    let shape: Vec<i64> = std::iter::once(local_batch)
        .chain(spec.first().into_iter().flat_map(|s| s.dims.iter().skip(1)).map(|d| match d {
            crate::models::Dim::Fixed(n) => *n,
            crate::models::Dim::Dynamic(_) => 1,
        }))
        .collect();
    tch::manual_seed(0);
    let x = Tensor::f_randn(shape.as_slice(), (Kind::Float, b.device))?;
    let y = Tensor::f_randint(b.model.num_classes, [local_batch], (Kind::Int64, b.device))?;
    let cuda_amp = b.amp && b.device.is_cuda();
    let mut times = Vec::with_capacity(b.steps);
    for i in 0..b.warmup + b.steps {
        sync(b.device);
        let t0 = Instant::now();
        opt.zero_grad();
        let out = tch::autocast(cuda_amp, || built.model.forward(&mut Eager::train(), std::slice::from_ref(&x)))?;
        let logits = out.into_iter().next().ok_or_else(|| TrainError::Shape("no output".into()))?;
        let loss =
            logits.f_to_kind(Kind::Float)?.f_cross_entropy_loss(&y, None::<Tensor>, tch::Reduction::Mean, -100, 0.0)?;
        if cuda_amp {
            loss.f_mul_scalar(scaler.scale)?.backward();
            ddp.average_gradients(&params)?;
            if scaler.unscale_and_update(params.iter())? {
                opt.step(1e-3)?;
            }
        } else {
            loss.backward();
            ddp.average_gradients(&params)?;
            opt.step(1e-3)?;
        }
        sync(b.device);
        if i >= b.warmup {
            times.push(t0.elapsed().as_secs_f64() * 1e3);
        }
    }
    let mut sorted = times.clone();
    sorted.sort_by(f64::total_cmp);
    let median = sorted.get(sorted.len() / 2).copied().unwrap_or(f64::NAN);
    let mean = times.iter().sum::<f64>() / times.len().max(1) as f64;
    Ok(StepReport {
        implementation: "kiln-train (tch)",
        model: format!("{:?}", b.model.arch).to_lowercase(),
        batch_size: b.batch_size,
        image_size: b.model.image_size,
        device: format!("{:?}", b.device).to_lowercase(),
        amp: cuda_amp,
        threads: tch::get_num_threads(),
        world_size: world,
        steps_ms: times,
        median_ms: median,
        mean_ms: mean,
        images_per_second: b.batch_size as f64 / (median / 1e3),
    })
}

fn sync(device: Device) {
    if let Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
}
