//! ResNet-18 and ResNet-50 with torchvision's layout, parameter names and initialisation
//! (v1.5: a bottleneck's stride sits on its 3×3 convolution), so torchvision state dicts
//! map onto them name for name. torchvision also stores each batch norm's
//! `num_batches_tracked`; it only matters for `momentum=None`, so it is not kept here.

use tch::nn::Path;

use super::layers::{KAIMING_FAN_OUT, batch_norm, conv2d, torch_linear};
use super::{Arch, IoSpec, ModelConfig, Network, image_io, one_input};
use crate::error::TrainError;
use crate::ops::{BatchNorm, Conv2d, Linear, Ops, Pool};

/// Output widths of the four stages (before a bottleneck's ×4 expansion).
const STAGE_WIDTHS: [i64; 4] = [64, 128, 256, 512];
const STAGE_STRIDES: [i64; 4] = [1, 2, 2, 2];

/// A convolution followed by its batch norm.
#[derive(Debug)]
struct ConvBn {
    conv: Conv2d,
    bn: BatchNorm,
}

impl ConvBn {
    /// `conv` and `bn` are sibling names under `path` (e.g. `conv1`/`bn1`, or `0`/`1` in a downsample).
    fn new(
        path: &Path<'_>,
        names: (&str, &str),
        (in_c, out_c, kernel, stride): (i64, i64, i64, i64),
    ) -> Result<Self, TrainError> {
        let conv = conv2d(&(path / names.0), in_c, out_c, kernel, stride, kernel / 2, false, KAIMING_FAN_OUT)?;
        Ok(ConvBn { conv, bn: batch_norm(&(path / names.1), out_c)? })
    }

    fn forward<O: Ops>(&self, ops: &mut O, x: &O::T, relu: bool) -> Result<O::T, TrainError> {
        let y = ops.conv2d(x, &self.conv)?;
        let y = ops.batch_norm(&y, &self.bn)?;
        if relu { ops.relu(&y) } else { Ok(y) }
    }
}

/// One residual block: its convolutions (the last without ReLU) and the optional projection shortcut.
#[derive(Debug)]
struct Block {
    convs: Vec<ConvBn>,
    downsample: Option<ConvBn>,
}

impl Block {
    /// torchvision's `BasicBlock`: 3×3 (stride) → 3×3.
    fn basic(path: &Path<'_>, in_c: i64, planes: i64, stride: i64) -> Result<Self, TrainError> {
        let convs = vec![
            ConvBn::new(path, ("conv1", "bn1"), (in_c, planes, 3, stride))?,
            ConvBn::new(path, ("conv2", "bn2"), (planes, planes, 3, 1))?,
        ];
        Ok(Block { convs, downsample: Self::downsample(path, in_c, planes, stride)? })
    }

    /// torchvision's `Bottleneck`: 1×1 → 3×3 (stride) → 1×1 (×4 channels).
    fn bottleneck(path: &Path<'_>, in_c: i64, planes: i64, stride: i64) -> Result<Self, TrainError> {
        let out_c = planes * 4;
        let convs = vec![
            ConvBn::new(path, ("conv1", "bn1"), (in_c, planes, 1, 1))?,
            ConvBn::new(path, ("conv2", "bn2"), (planes, planes, 3, stride))?,
            ConvBn::new(path, ("conv3", "bn3"), (planes, out_c, 1, 1))?,
        ];
        Ok(Block { convs, downsample: Self::downsample(path, in_c, out_c, stride)? })
    }

    fn downsample(path: &Path<'_>, in_c: i64, out_c: i64, stride: i64) -> Result<Option<ConvBn>, TrainError> {
        if stride == 1 && in_c == out_c {
            return Ok(None);
        }
        Ok(Some(ConvBn::new(&(path / "downsample"), ("0", "1"), (in_c, out_c, 1, stride))?))
    }

    fn forward<O: Ops>(&self, ops: &mut O, x: &O::T) -> Result<O::T, TrainError> {
        let last = self.convs.len().saturating_sub(1);
        let mut y: Option<O::T> = None;
        for (i, cb) in self.convs.iter().enumerate() {
            y = Some(cb.forward(ops, y.as_ref().unwrap_or(x), i != last)?);
        }
        let y = y.ok_or_else(|| TrainError::Shape("residual block without convolutions".into()))?;
        let sum = match &self.downsample {
            Some(ds) => {
                let shortcut = ds.forward(ops, x, false)?;
                ops.add(&y, &shortcut)?
            }
            None => ops.add(&y, x)?,
        };
        ops.relu(&sum)
    }
}

/// ResNet-18 (basic blocks `[2, 2, 2, 2]`) or ResNet-50 (bottlenecks `[3, 4, 6, 3]`).
#[derive(Debug)]
pub struct ResNet {
    stem: ConvBn,
    /// `layer1` … `layer4`.
    stages: Vec<Vec<Block>>,
    fc: Linear,
    in_channels: i64,
    image_size: i64,
    num_classes: i64,
}

impl ResNet {
    /// `cfg.arch` picks the depth; `in_channels`, `image_size` and `num_classes` come from `cfg`.
    pub fn new(path: &Path<'_>, cfg: &ModelConfig) -> Result<Self, TrainError> {
        let (bottleneck, depths) = match cfg.arch {
            Arch::Resnet18 => (false, [2, 2, 2, 2]),
            Arch::Resnet50 => (true, [3, 4, 6, 3]),
            other => return Err(TrainError::Config(format!("ResNet::new called with arch {other:?}"))),
        };
        let stem = ConvBn::new(path, ("conv1", "bn1"), (cfg.in_channels, 64, 7, 2))?;
        let mut in_c = 64;
        let mut stages = Vec::with_capacity(depths.len());
        for (s, ((&planes, &stride), &depth)) in STAGE_WIDTHS.iter().zip(&STAGE_STRIDES).zip(&depths).enumerate() {
            let stage_path = path / format!("layer{}", s + 1);
            let mut blocks = Vec::with_capacity(depth);
            for b in 0..depth {
                let block_path = &stage_path / b;
                let stride = if b == 0 { stride } else { 1 };
                let block = if bottleneck {
                    Block::bottleneck(&block_path, in_c, planes, stride)?
                } else {
                    Block::basic(&block_path, in_c, planes, stride)?
                };
                in_c = if bottleneck { planes * 4 } else { planes };
                blocks.push(block);
            }
            stages.push(blocks);
        }
        let fc = torch_linear(&(path / "fc"), in_c, cfg.num_classes)?;
        Ok(ResNet {
            stem,
            stages,
            fc,
            in_channels: cfg.in_channels,
            image_size: cfg.image_size,
            num_classes: cfg.num_classes,
        })
    }
}

impl Network for ResNet {
    fn inputs(&self) -> Vec<IoSpec> {
        image_io(self.in_channels, self.image_size, self.num_classes).0
    }

    fn outputs(&self) -> Vec<IoSpec> {
        image_io(self.in_channels, self.image_size, self.num_classes).1
    }

    fn forward<O: Ops>(&self, ops: &mut O, inputs: &[O::T]) -> Result<Vec<O::T>, TrainError> {
        let image = one_input("ResNet", inputs)?;
        let x = self.stem.forward(ops, image, true)?;
        let mut x = ops.max_pool2d(&x, Pool { kernel: 3, stride: 2, padding: 1 })?;
        for block in self.stages.iter().flatten() {
            x = block.forward(ops, &x)?;
        }
        let x = ops.global_avg_pool(&x)?;
        Ok(vec![ops.linear(&x, &self.fc)?])
    }
}
