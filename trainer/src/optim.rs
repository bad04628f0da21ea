//! AdamW, the warm-up + cosine learning-rate schedule, gradient clipping and dynamic
//! loss scaling.
//!
//! AdamW is written here rather than taken from `tch::nn::AdamW` because a checkpoint
//! must carry the optimizer's moments so that `--resume` continues bit-identically, and
//! libtorch's optimizer state is not reachable through tch.

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use crate::error::TrainError;

/// AdamW hyper-parameters (PyTorch's defaults except weight decay).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.05 }
    }
}

/// One optimised tensor with its moments. Biases and normalisation scales (1-D) are not
/// decayed: decaying them hurts accuracy and is what BERT and timm recipes do.
#[derive(Debug)]
struct Slot {
    name: String,
    param: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    decay: bool,
}

/// AdamW over named parameters, PyTorch's update rule:
/// `p ← p·(1 − lr·wd)`, `m ← β₁m + (1 − β₁)g`, `v ← β₂v + (1 − β₂)g²`,
/// `p ← p − lr/(1 − β₁ᵗ) · m / (√v/√(1 − β₂ᵗ) + ε)`.
#[derive(Debug)]
pub struct AdamW {
    config: AdamWConfig,
    slots: Vec<Slot>,
    step: u64,
}

impl AdamW {
    /// `params`: the trainable variables by checkpoint name.
    pub fn new(params: Vec<(String, Tensor)>, config: AdamWConfig) -> Result<Self, TrainError> {
        let slots = params
            .into_iter()
            .map(|(name, param)| {
                let decay = param.dim() > 1;
                let exp_avg = param.f_zeros_like()?;
                let exp_avg_sq = param.f_zeros_like()?;
                Ok(Slot { name, param, exp_avg, exp_avg_sq, decay })
            })
            .collect::<Result<Vec<_>, TrainError>>()?;
        Ok(AdamW { config, slots, step: 0 })
    }

    /// Number of optimizer steps taken (the `t` of the bias corrections).
    pub fn steps(&self) -> u64 {
        self.step
    }

    pub fn params(&self) -> impl Iterator<Item = &Tensor> {
        self.slots.iter().map(|s| &s.param)
    }

    pub fn zero_grad(&mut self) {
        for slot in &mut self.slots {
            let mut grad = slot.param.grad();
            if grad.defined() {
                let _ = grad.detach_().zero_();
            }
        }
    }

    /// Applies one update at learning rate `lr`. Parameters without a gradient are skipped.
    pub fn step(&mut self, lr: f64) -> Result<(), TrainError> {
        self.step += 1;
        let c = &self.config;
        let t = self.step as f64;
        let bias1 = 1.0 - c.beta1.powf(t);
        let bias2_sqrt = (1.0 - c.beta2.powf(t)).sqrt();
        tch::no_grad(|| -> Result<(), TrainError> {
            for slot in &mut self.slots {
                let grad = slot.param.grad();
                if !grad.defined() {
                    continue;
                }
                let grad = if grad.kind() == slot.param.kind() { grad } else { grad.f_to_kind(slot.param.kind())? };
                if slot.decay && c.weight_decay != 0.0 {
                    let _ = slot.param.f_mul_scalar_(1.0 - lr * c.weight_decay)?;
                }
                let _ = slot.exp_avg.f_lerp_(&grad, 1.0 - c.beta1)?;
                let _ = slot.exp_avg_sq.f_mul_scalar_(c.beta2)?;
                let _ = slot.exp_avg_sq.f_addcmul_(&grad, &grad.f_mul_scalar(1.0 - c.beta2)?)?;
                // p += m / d with d = -(√v/√(1-β₂ᵗ) + ε)·(1-β₁ᵗ)/lr: the step size folded into
                // the denominator saves one parameter-sized temporary per tensor.
                let mut denom = slot.exp_avg_sq.f_sqrt()?;
                let _ = denom.f_div_scalar_(bias2_sqrt)?;
                let _ = denom.f_add_scalar_(c.eps)?;
                let _ = denom.f_mul_scalar_(-bias1 / lr)?;
                let _ = slot.param.f_addcdiv_(&slot.exp_avg, &denom)?;
            }
            Ok(())
        })
    }

    /// The moments as named tensors, for a checkpoint.
    pub fn state(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::with_capacity(self.slots.len() * 2);
        for s in &self.slots {
            out.push((format!("exp_avg.{}", s.name), s.exp_avg.shallow_clone()));
            out.push((format!("exp_avg_sq.{}", s.name), s.exp_avg_sq.shallow_clone()));
        }
        out
    }

    /// Restores moments saved by [`AdamW::state`] and the step count. Every slot must be present.
    pub fn load_state(&mut self, state: &[(String, Tensor)], step: u64) -> Result<(), TrainError> {
        let find = |key: String| {
            state
                .iter()
                .find(|(n, _)| *n == key)
                .map(|(_, t)| t)
                .ok_or_else(|| TrainError::Config(format!("optimizer state has no `{key}`")))
        };
        tch::no_grad(|| -> Result<(), TrainError> {
            for s in &mut self.slots {
                let m = find(format!("exp_avg.{}", s.name))?;
                let v = find(format!("exp_avg_sq.{}", s.name))?;
                if m.size() != s.param.size() || v.size() != s.param.size() {
                    return Err(TrainError::Config(format!("optimizer state for `{}` has the wrong shape", s.name)));
                }
                s.exp_avg.f_copy_(m)?;
                s.exp_avg_sq.f_copy_(v)?;
            }
            Ok(())
        })?;
        self.step = step;
        Ok(())
    }
}

/// Linear warm-up to `base_lr`, then a cosine decay to `min_lr` at `total_steps`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CosineSchedule {
    pub base_lr: f64,
    pub min_lr: f64,
    pub warmup_steps: u64,
    pub total_steps: u64,
}

impl CosineSchedule {
    /// Learning rate for the update with 0-based index `step`.
    pub fn lr(&self, step: u64) -> f64 {
        if step < self.warmup_steps {
            return self.base_lr * (step + 1) as f64 / self.warmup_steps as f64;
        }
        let span = self.total_steps.saturating_sub(self.warmup_steps).max(1);
        let progress = ((step - self.warmup_steps) as f64 / span as f64).min(1.0);
        self.min_lr + 0.5 * (self.base_lr - self.min_lr) * (1.0 + (std::f64::consts::PI * progress).cos())
    }
}

/// Scales all gradients so their global L2 norm is at most `max_norm`; returns the norm
/// before clipping (as PyTorch's `clip_grad_norm_`).
pub fn clip_grad_norm<'a>(params: impl Iterator<Item = &'a Tensor>, max_norm: f64) -> Result<f64, TrainError> {
    let grads: Vec<Tensor> = params.map(|p| p.grad()).filter(|g| g.defined()).collect();
    if grads.is_empty() {
        return Ok(0.0);
    }
    let total = tch::no_grad(|| -> Result<f64, TrainError> {
        let mut sq = Tensor::f_zeros([], (Kind::Double, grads[0].device()))?;
        for g in &grads {
            let n = g.f_to_kind(Kind::Double)?.f_norm()?;
            sq = sq.f_add(&n.f_mul(&n)?)?;
        }
        Ok(sq.f_sqrt()?.f_double_value(&[])?)
    })?;
    if total.is_finite() && total > max_norm {
        let coef = max_norm / (total + 1e-6);
        tch::no_grad(|| -> Result<(), TrainError> {
            for g in &grads {
                let mut g = g.shallow_clone();
                let _ = g.f_mul_scalar_(coef)?;
            }
            Ok(())
        })?;
    }
    Ok(total)
}

/// Dynamic loss scaling for FP16 mixed precision (PyTorch's `GradScaler` policy): the
/// loss is multiplied by `scale` before backward; a step whose gradients overflow is
/// skipped and the scale halved; after `growth_interval` clean steps it doubles.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LossScaler {
    pub scale: f64,
    pub growth_interval: u64,
    pub clean_steps: u64,
}

impl Default for LossScaler {
    fn default() -> Self {
        LossScaler { scale: 65536.0, growth_interval: 2000, clean_steps: 0 }
    }
}

impl LossScaler {
    /// Divides the gradients by the scale; returns whether they are all finite (the step
    /// may proceed) and updates the scale for the next step.
    pub fn unscale_and_update<'a>(&mut self, params: impl Iterator<Item = &'a Tensor>) -> Result<bool, TrainError> {
        let inv = 1.0 / self.scale;
        let finite = tch::no_grad(|| -> Result<bool, TrainError> {
            // One device-side sum and a single host sync: a NaN or infinity anywhere makes
            // the sum non-finite. (A per-tensor check would stall the GPU once per tensor.)
            let mut total: Option<Tensor> = None;
            for p in params {
                let mut g = p.grad();
                if !g.defined() {
                    continue;
                }
                let _ = g.f_mul_scalar_(inv)?;
                let s = g.f_sum(Kind::Float)?;
                total = Some(match total {
                    Some(t) => t.f_add(&s)?,
                    None => s,
                });
            }
            match total {
                Some(t) => Ok(t.f_double_value(&[])?.is_finite()),
                None => Ok(true),
            }
        })?;
        if finite {
            self.clean_steps += 1;
            if self.clean_steps >= self.growth_interval {
                self.scale *= 2.0;
                self.clean_steps = 0;
            }
        } else {
            self.scale = (self.scale * 0.5).max(1.0);
            self.clean_steps = 0;
        }
        Ok(finite)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn cosine_warms_up_then_decays_to_min() {
        let s = CosineSchedule { base_lr: 1.0, min_lr: 0.1, warmup_steps: 4, total_steps: 14 };
        assert!((s.lr(0) - 0.25).abs() < 1e-12);
        assert!((s.lr(3) - 1.0).abs() < 1e-12);
        assert!((s.lr(4) - 1.0).abs() < 1e-12);
        assert!((s.lr(9) - 0.55).abs() < 1e-12);
        assert!((s.lr(14) - 0.1).abs() < 1e-12);
        assert!((s.lr(100) - 0.1).abs() < 1e-12);
    }

    /// Two AdamW steps on f(p) = Σ p², checked against the update rule computed by hand.
    #[test]
    fn adamw_matches_the_reference_update() {
        let p = Tensor::from_slice(&[1.0f32, -2.0, 0.5, 3.0]).view([2, 2]).set_requires_grad(true);
        let cfg = AdamWConfig { beta1: 0.9, beta2: 0.99, eps: 1e-8, weight_decay: 0.1 };
        let mut opt = AdamW::new(vec![("w".into(), p.shallow_clone())], cfg.clone()).unwrap();
        let mut expect: Vec<f64> = vec![1.0, -2.0, 0.5, 3.0];
        let (mut m, mut v) = (vec![0.0f64; 4], vec![0.0f64; 4]);
        for t in 1..=2 {
            opt.zero_grad();
            p.square().sum(Kind::Float).backward();
            opt.step(0.01).unwrap();
            for i in 0..4 {
                let g = 2.0 * expect[i];
                expect[i] *= 1.0 - 0.01 * cfg.weight_decay;
                m[i] = 0.9 * m[i] + 0.1 * g;
                v[i] = 0.99 * v[i] + 0.01 * g * g;
                let mh = m[i] / (1.0 - 0.9f64.powi(t));
                let vh = (v[i] / (1.0 - 0.99f64.powi(t))).sqrt();
                expect[i] -= 0.01 * mh / (vh + 1e-8);
            }
        }
        let got = Vec::<f32>::try_from(&p.detach().view([-1])).unwrap();
        for (g, e) in got.iter().zip(&expect) {
            assert!((f64::from(*g) - e).abs() < 1e-6, "{got:?} vs {expect:?}");
        }
        assert_eq!(opt.steps(), 2);
    }

    #[test]
    fn clipping_bounds_the_global_norm() {
        let a = Tensor::from_slice(&[3.0f32]).set_requires_grad(true);
        let b = Tensor::from_slice(&[4.0f32]).set_requires_grad(true);
        (a.square().sum(Kind::Float) + b.square().sum(Kind::Float)).backward();
        // grads are 6 and 8: norm 10.
        let norm = clip_grad_norm([&a, &b].into_iter(), 5.0).unwrap();
        assert!((norm - 10.0).abs() < 1e-9);
        let ga = a.grad().double_value(&[0]);
        let gb = b.grad().double_value(&[0]);
        assert!(((ga * ga + gb * gb).sqrt() - 5.0).abs() < 1e-3);
    }

    #[test]
    fn scaler_skips_overflow_and_backs_off() {
        let a = Tensor::from_slice(&[1.0f32]).set_requires_grad(true);
        (a.shallow_clone() * f64::INFINITY).sum(Kind::Float).backward();
        let mut s = LossScaler { scale: 1024.0, growth_interval: 2, clean_steps: 0 };
        assert!(!s.unscale_and_update([&a].into_iter()).unwrap());
        assert_eq!(s.scale, 512.0);
        let b = Tensor::from_slice(&[1.0f32]).set_requires_grad(true);
        (b.shallow_clone() * 512.0).sum(Kind::Float).backward();
        assert!(s.unscale_and_update([&b].into_iter()).unwrap());
        assert!((b.grad().double_value(&[0]) - 1.0).abs() < 1e-9);
        assert!(s.unscale_and_update([&b].into_iter()).unwrap());
        assert_eq!(s.scale, 1024.0);
    }
}
