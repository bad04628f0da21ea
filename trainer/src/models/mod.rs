//! The model zoo. Every model implements [`Network`]: its forward pass is written once
//! over [`Ops`], so the same code trains in libtorch and exports to ONNX.

use serde::{Deserialize, Serialize};

use crate::error::TrainError;
use crate::ops::Ops;

pub mod bert;
pub mod cnn;
pub mod resnet;

/// One dimension of a model input or output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dim {
    Fixed(i64),
    /// A symbolic dimension, e.g. `batch` or `sequence`.
    Dynamic(&'static str),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ElemKind {
    F32,
    I64,
}

/// A named model input or output, as it appears in the exported ONNX graph.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IoSpec {
    pub name: String,
    pub kind: ElemKind,
    pub dims: Vec<Dim>,
}

/// A model kiln can train and export.
pub trait Network {
    fn inputs(&self) -> Vec<IoSpec>;
    fn outputs(&self) -> Vec<IoSpec>;
    /// `inputs` are in the order of [`Network::inputs`]; the result in the order of [`Network::outputs`].
    fn forward<O: Ops>(&self, ops: &mut O, inputs: &[O::T]) -> Result<Vec<O::T>, TrainError>;
}

/// Which architecture, as written in checkpoints' metadata and on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Arch {
    SmallCnn,
    Resnet18,
    Resnet50,
    Bert,
}

pub use bert::{Bert, BertConfig, BertHead, sentence_embeddings};
pub use cnn::SmallCnn;
pub use resnet::ResNet;

/// What to build: the architecture and its hyper-parameters, stored in checkpoints' metadata.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub arch: Arch,
    /// Width of the `logits` output. For BERT it must equal the classifier head's `num_labels`
    /// (and is unused with the embedding head).
    pub num_classes: i64,
    /// Image channels (image models only).
    pub in_channels: i64,
    /// The fixed height and width of the exported `image` input (image models only).
    pub image_size: i64,
    /// Dropout before the small CNN's linear layers; BERT takes its dropouts from [`BertConfig`].
    pub dropout: f64,
    /// Required when `arch` is [`Arch::Bert`].
    #[serde(default)]
    pub bert: Option<BertConfig>,
    /// Batch normalisation in the small CNN (conv biases instead when off). Off makes each
    /// example's gradient independent of the rest of its batch, which is what lets a
    /// data-parallel run equal a single-process one exactly.
    #[serde(default = "default_true")]
    pub batch_norm: bool,
}

fn default_true() -> bool {
    true
}

impl ModelConfig {
    /// The small CNN for 28×28 grey images (Fashion-MNIST).
    pub fn small_cnn(num_classes: i64) -> Self {
        ModelConfig {
            arch: Arch::SmallCnn,
            num_classes,
            in_channels: 1,
            image_size: 28,
            dropout: 0.25,
            bert: None,
            batch_norm: true,
        }
    }

    /// ResNet-18 on 224×224 RGB images.
    pub fn resnet18(num_classes: i64) -> Self {
        ModelConfig {
            arch: Arch::Resnet18,
            num_classes,
            in_channels: 3,
            image_size: 224,
            dropout: 0.0,
            bert: None,
            batch_norm: true,
        }
    }

    /// ResNet-50 on 224×224 RGB images.
    pub fn resnet50(num_classes: i64) -> Self {
        ModelConfig { arch: Arch::Resnet50, ..Self::resnet18(num_classes) }
    }

    /// A BERT encoder; `num_classes` follows the head (0 for the embedding head).
    pub fn bert(bert: BertConfig) -> Self {
        let num_classes = match bert.head {
            BertHead::Embeddings => 0,
            BertHead::Classifier { num_labels } => num_labels,
        };
        ModelConfig {
            arch: Arch::Bert,
            num_classes,
            in_channels: 0,
            image_size: 0,
            dropout: 0.0,
            bert: Some(bert),
            batch_norm: false,
        }
    }

    /// Checks the fields the chosen architecture uses.
    pub fn validate(&self) -> Result<(), TrainError> {
        let bad = |msg: String| Err(TrainError::Config(msg));
        if !(0.0..1.0).contains(&self.dropout) {
            return bad(format!("dropout must be in [0, 1), got {}", self.dropout));
        }
        match self.arch {
            Arch::SmallCnn | Arch::Resnet18 | Arch::Resnet50 => {
                if self.num_classes < 1 || self.in_channels < 1 || self.image_size < 1 {
                    return bad(format!(
                        "{:?} needs positive num_classes, in_channels and image_size, got {}, {}, {}",
                        self.arch, self.num_classes, self.in_channels, self.image_size
                    ));
                }
                if self.arch == Arch::SmallCnn && self.image_size % 4 != 0 {
                    return bad(format!("the small CNN needs image_size divisible by 4, got {}", self.image_size));
                }
                Ok(())
            }
            Arch::Bert => {
                let Some(bert) = &self.bert else {
                    return bad("arch bert needs a `bert` config".into());
                };
                bert.validate()?;
                match bert.head {
                    BertHead::Classifier { num_labels } if num_labels != self.num_classes => bad(format!(
                        "num_classes {} differs from the BERT classifier's num_labels {num_labels}",
                        self.num_classes
                    )),
                    _ => Ok(()),
                }
            }
        }
    }
}

/// Any zoo model, built from a [`ModelConfig`].
#[derive(Debug)]
pub enum Zoo {
    SmallCnn(SmallCnn),
    ResNet(ResNet),
    Bert(Bert),
}

impl Zoo {
    /// Registers the model's parameters under `path` (names as in the matching PyTorch checkpoints).
    pub fn new(path: &tch::nn::Path<'_>, cfg: &ModelConfig) -> Result<Zoo, TrainError> {
        cfg.validate()?;
        Ok(match cfg.arch {
            Arch::SmallCnn => Zoo::SmallCnn(SmallCnn::new(path, cfg)?),
            Arch::Resnet18 | Arch::Resnet50 => Zoo::ResNet(ResNet::new(path, cfg)?),
            Arch::Bert => {
                let bert =
                    cfg.bert.as_ref().ok_or_else(|| TrainError::Config("arch bert needs a `bert` config".into()))?;
                Zoo::Bert(Bert::new(path, bert)?)
            }
        })
    }

    /// The BERT model, for pretrained loading and sentence embeddings.
    pub fn as_bert(&self) -> Option<&Bert> {
        match self {
            Zoo::Bert(b) => Some(b),
            _ => None,
        }
    }
}

impl Network for Zoo {
    fn inputs(&self) -> Vec<IoSpec> {
        match self {
            Zoo::SmallCnn(m) => m.inputs(),
            Zoo::ResNet(m) => m.inputs(),
            Zoo::Bert(m) => m.inputs(),
        }
    }

    fn outputs(&self) -> Vec<IoSpec> {
        match self {
            Zoo::SmallCnn(m) => m.outputs(),
            Zoo::ResNet(m) => m.outputs(),
            Zoo::Bert(m) => m.outputs(),
        }
    }

    fn forward<O: Ops>(&self, ops: &mut O, inputs: &[O::T]) -> Result<Vec<O::T>, TrainError> {
        match self {
            Zoo::SmallCnn(m) => m.forward(ops, inputs),
            Zoo::ResNet(m) => m.forward(ops, inputs),
            Zoo::Bert(m) => m.forward(ops, inputs),
        }
    }
}

/// The `image` input `[batch, C, H, W]` and `logits` output `[batch, classes]` of the image models.
pub(crate) fn image_io(in_channels: i64, image_size: i64, num_classes: i64) -> (Vec<IoSpec>, Vec<IoSpec>) {
    let image = IoSpec {
        name: "image".into(),
        kind: ElemKind::F32,
        dims: vec![Dim::Dynamic("batch"), Dim::Fixed(in_channels), Dim::Fixed(image_size), Dim::Fixed(image_size)],
    };
    (vec![image], vec![logits_spec(num_classes)])
}

pub(crate) fn logits_spec(num_classes: i64) -> IoSpec {
    IoSpec { name: "logits".into(), kind: ElemKind::F32, dims: vec![Dim::Dynamic("batch"), Dim::Fixed(num_classes)] }
}

/// The single input of an image model, or an error naming the model.
pub(crate) fn one_input<'a, T>(model: &str, inputs: &'a [T]) -> Result<&'a T, TrainError> {
    match inputs {
        [x] => Ok(x),
        _ => Err(TrainError::Shape(format!("{model} takes 1 input (image), got {}", inputs.len()))),
    }
}

/// Layer constructors shared by the zoo: each registers its tensors under `path` with
/// PyTorch's names (`weight`, `bias`, `running_mean`, `running_var`).
pub mod layers {
    use tch::nn::Path;
    use tch::nn::init::{FanInOut, Init, NonLinearity, NormalOrUniform};

    use crate::error::TrainError;
    use crate::ops::{BatchNorm, Conv2d, LayerNorm, Linear, Param};

    /// torchvision's conv init: `kaiming_normal_(mode="fan_out", nonlinearity="relu")`.
    pub const KAIMING_FAN_OUT: Init =
        Init::Kaiming { dist: NormalOrUniform::Normal, fan: FanInOut::FanOut, non_linearity: NonLinearity::ReLU };

    /// PyTorch's default `nn.Linear`/`nn.Conv2d` init, `kaiming_uniform_(a=√5)`, which
    /// reduces to U(−1/√fan_in, 1/√fan_in); the bias uses the same bound.
    pub fn torch_default(fan_in: i64) -> Init {
        let bound = 1.0 / (fan_in.max(1) as f64).sqrt();
        Init::Uniform { lo: -bound, up: bound }
    }

    /// Square `kernel`×`kernel` convolution without groups.
    #[allow(clippy::too_many_arguments)]
    pub fn conv2d(
        path: &Path<'_>,
        in_c: i64,
        out_c: i64,
        kernel: i64,
        stride: i64,
        padding: i64,
        bias: bool,
        init: Init,
    ) -> Result<Conv2d, TrainError> {
        let weight = Param::var(path, "weight", &[out_c, in_c, kernel, kernel], init)?;
        let bias =
            if bias { Some(Param::var(path, "bias", &[out_c], torch_default(in_c * kernel * kernel))?) } else { None };
        Ok(Conv2d { weight, bias, stride, padding, groups: 1 })
    }

    /// Batch norm with PyTorch's defaults: weight 1, bias 0, eps 1e-5, momentum 0.1.
    pub fn batch_norm(path: &Path<'_>, channels: i64) -> Result<BatchNorm, TrainError> {
        Ok(BatchNorm {
            weight: Param::var(path, "weight", &[channels], Init::Const(1.0))?,
            bias: Param::var(path, "bias", &[channels], Init::Const(0.0))?,
            running_mean: Param::buffer(path, "running_mean", &[channels], 0.0)?,
            running_var: Param::buffer(path, "running_var", &[channels], 1.0)?,
            eps: 1e-5,
            momentum: 0.1,
        })
    }

    /// Linear layer with explicit inits for the weight and the bias.
    pub fn linear(path: &Path<'_>, in_dim: i64, out_dim: i64, weight: Init, bias: Init) -> Result<Linear, TrainError> {
        Ok(Linear {
            weight: Param::var(path, "weight", &[out_dim, in_dim], weight)?,
            bias: Some(Param::var(path, "bias", &[out_dim], bias)?),
        })
    }

    /// Linear layer with PyTorch's default init.
    pub fn torch_linear(path: &Path<'_>, in_dim: i64, out_dim: i64) -> Result<Linear, TrainError> {
        linear(path, in_dim, out_dim, torch_default(in_dim), torch_default(in_dim))
    }

    /// Layer norm over a last dimension of `dim`: weight 1, bias 0.
    pub fn layer_norm(path: &Path<'_>, dim: i64, eps: f64) -> Result<LayerNorm, TrainError> {
        Ok(LayerNorm {
            weight: Param::var(path, "weight", &[dim], Init::Const(1.0))?,
            bias: Param::var(path, "bias", &[dim], Init::Const(0.0))?,
            eps,
        })
    }
}
