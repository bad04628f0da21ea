//! A small VGG-style CNN for 28×28 grey images (Fashion-MNIST): two conv-BN-ReLU pairs,
//! max-pool, two more, max-pool, then a two-layer classifier. About 19 M multiply-adds
//! per 28×28 image, so a few epochs fit on a CPU.

use tch::nn::Path;

use super::layers::{KAIMING_FAN_OUT, batch_norm, conv2d, torch_linear};
use super::{IoSpec, ModelConfig, Network, image_io, one_input};
use crate::error::TrainError;
use crate::ops::{BatchNorm, Conv2d, Linear, Ops, Pool};

/// Channel widths of the four convolutions.
const WIDTHS: [i64; 4] = [32, 32, 64, 64];
const HIDDEN: i64 = 256;

/// The small CNN. Parameter names: `conv{1..4}.weight`, `bn{1..4}.*`, `fc1.*`, `fc2.*`.
#[derive(Debug)]
pub struct SmallCnn {
    convs: Vec<(Conv2d, Option<BatchNorm>)>,
    fc1: Linear,
    fc2: Linear,
    dropout: f64,
    in_channels: i64,
    image_size: i64,
    num_classes: i64,
}

impl SmallCnn {
    /// Uses `in_channels`, `image_size` (divisible by 4), `num_classes` and `dropout` from `cfg`.
    pub fn new(path: &Path<'_>, cfg: &ModelConfig) -> Result<Self, TrainError> {
        if cfg.image_size < 4 || cfg.image_size % 4 != 0 {
            return Err(TrainError::Config(format!(
                "the small CNN needs image_size divisible by 4, got {}",
                cfg.image_size
            )));
        }
        let mut convs = Vec::with_capacity(WIDTHS.len());
        let mut in_c = cfg.in_channels;
        for (i, &out_c) in WIDTHS.iter().enumerate() {
            // No conv bias before a batch norm: it would cancel it.
            let bias = !cfg.batch_norm;
            let conv = conv2d(&(path / format!("conv{}", i + 1)), in_c, out_c, 3, 1, 1, bias, KAIMING_FAN_OUT)?;
            let bn = if cfg.batch_norm { Some(batch_norm(&(path / format!("bn{}", i + 1)), out_c)?) } else { None };
            convs.push((conv, bn));
            in_c = out_c;
        }
        let side = cfg.image_size / 4;
        let fc1 = torch_linear(&(path / "fc1"), in_c * side * side, HIDDEN)?;
        let fc2 = torch_linear(&(path / "fc2"), HIDDEN, cfg.num_classes)?;
        Ok(SmallCnn {
            convs,
            fc1,
            fc2,
            dropout: cfg.dropout,
            in_channels: cfg.in_channels,
            image_size: cfg.image_size,
            num_classes: cfg.num_classes,
        })
    }
}

impl Network for SmallCnn {
    fn inputs(&self) -> Vec<IoSpec> {
        image_io(self.in_channels, self.image_size, self.num_classes).0
    }

    fn outputs(&self) -> Vec<IoSpec> {
        image_io(self.in_channels, self.image_size, self.num_classes).1
    }

    fn forward<O: Ops>(&self, ops: &mut O, inputs: &[O::T]) -> Result<Vec<O::T>, TrainError> {
        let pool = Pool { kernel: 2, stride: 2, padding: 0 };
        let image = one_input("small CNN", inputs)?;
        let mut features: Option<O::T> = None;
        for (i, (conv, bn)) in self.convs.iter().enumerate() {
            let y = ops.conv2d(features.as_ref().unwrap_or(image), conv)?;
            let y = match bn {
                Some(bn) => ops.batch_norm(&y, bn)?,
                None => y,
            };
            let mut y = ops.relu(&y)?;
            if i % 2 == 1 {
                y = ops.max_pool2d(&y, pool)?;
            }
            features = Some(y);
        }
        let x = ops.flatten(features.as_ref().unwrap_or(image))?;
        let x = ops.dropout(&x, self.dropout)?;
        let x = ops.linear(&x, &self.fc1)?;
        let x = ops.relu(&x)?;
        let x = ops.dropout(&x, self.dropout)?;
        Ok(vec![ops.linear(&x, &self.fc2)?])
    }
}
