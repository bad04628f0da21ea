//! The operations kiln's models are written in.
//!
//! Each zoo model writes its forward pass once, generic over [`Ops`]. Two interpreters
//! run it: [`crate::eager::Eager`] computes it with libtorch (training and evaluation),
//! and the ONNX tracer in [`crate::export`] records the same calls as ONNX nodes. The
//! exported graph therefore cannot drift from the trained model: there is no second
//! description of the architecture to keep in sync.

use tch::Tensor;

use crate::error::TrainError;

/// A learnable (or running-statistics) tensor with its checkpoint name, e.g.
/// `layer1.0.conv1.weight`. The name becomes the ONNX initializer's name.
#[derive(Debug)]
pub struct Param {
    pub name: String,
    pub tensor: Tensor,
}

impl Param {
    /// Registers a trainable variable under `path` (a `tch::nn::Path`) with the given init.
    pub fn var(path: &tch::nn::Path<'_>, name: &str, dims: &[i64], init: tch::nn::Init) -> Result<Self, TrainError> {
        let tensor = path.f_var(name, dims, init)?;
        Ok(Param { name: path.path(name), tensor })
    }

    /// Registers a non-trainable buffer (batch-norm running statistics).
    pub fn buffer(path: &tch::nn::Path<'_>, name: &str, dims: &[i64], init: f64) -> Result<Self, TrainError> {
        let tensor = if init == 0.0 { path.f_zeros_no_train(name, dims)? } else { path.f_ones_no_train(name, dims)? };
        Ok(Param { name: path.path(name), tensor })
    }
}

/// 2-D convolution, weight `[out, in / groups, kh, kw]`, symmetric padding.
#[derive(Debug)]
pub struct Conv2d {
    pub weight: Param,
    pub bias: Option<Param>,
    pub stride: i64,
    pub padding: i64,
    pub groups: i64,
}

/// Batch normalisation over channels (dim 1), PyTorch semantics (momentum 0.1 by default).
#[derive(Debug)]
pub struct BatchNorm {
    pub weight: Param,
    pub bias: Param,
    pub running_mean: Param,
    pub running_var: Param,
    pub eps: f64,
    pub momentum: f64,
}

/// Fully connected layer over the last dimension: `y = x Wᵀ + b`, weight `[out, in]`.
#[derive(Debug)]
pub struct Linear {
    pub weight: Param,
    pub bias: Option<Param>,
}

/// Layer normalisation over the last dimension.
#[derive(Debug)]
pub struct LayerNorm {
    pub weight: Param,
    pub bias: Param,
    pub eps: f64,
}

/// Max pooling window.
#[derive(Debug, Clone, Copy)]
pub struct Pool {
    pub kernel: i64,
    pub stride: i64,
    pub padding: i64,
}

/// The operation set. `T` is a value: a libtorch tensor when computing, a graph value
/// name when tracing. Every method returns a new value and never mutates its inputs.
pub trait Ops {
    type T;

    fn conv2d(&mut self, x: &Self::T, conv: &Conv2d) -> Result<Self::T, TrainError>;
    /// Uses batch statistics (and updates the running ones) in training, running statistics otherwise.
    fn batch_norm(&mut self, x: &Self::T, bn: &BatchNorm) -> Result<Self::T, TrainError>;
    fn linear(&mut self, x: &Self::T, fc: &Linear) -> Result<Self::T, TrainError>;
    fn layer_norm(&mut self, x: &Self::T, ln: &LayerNorm) -> Result<Self::T, TrainError>;
    /// Rows of `table` (`[vocab, dim]`) picked by the int64 `ids` (`[N, S]`) → `[N, S, dim]`.
    fn embedding(&mut self, ids: &Self::T, table: &Param) -> Result<Self::T, TrainError>;
    /// The first `S` rows of `table` (`[max_len, dim]`), where `S` is dim 1 of `like`
    /// (`[N, S]`), shaped `[1, S, dim]` — position embeddings for a dynamic sequence length.
    fn position_embedding(&mut self, like: &Self::T, table: &Param) -> Result<Self::T, TrainError>;

    fn relu(&mut self, x: &Self::T) -> Result<Self::T, TrainError>;
    /// Exact (erf) GELU, as BERT uses.
    fn gelu(&mut self, x: &Self::T) -> Result<Self::T, TrainError>;
    fn tanh(&mut self, x: &Self::T) -> Result<Self::T, TrainError>;
    /// Elementwise sum with broadcasting.
    fn add(&mut self, a: &Self::T, b: &Self::T) -> Result<Self::T, TrainError>;
    fn scale(&mut self, x: &Self::T, factor: f64) -> Result<Self::T, TrainError>;
    /// Batched matrix product over the last two dimensions.
    fn matmul(&mut self, a: &Self::T, b: &Self::T) -> Result<Self::T, TrainError>;
    /// Softmax over the last dimension.
    fn softmax(&mut self, x: &Self::T) -> Result<Self::T, TrainError>;
    /// Identity when not training (and always in an exported graph).
    fn dropout(&mut self, x: &Self::T, p: f64) -> Result<Self::T, TrainError>;

    fn max_pool2d(&mut self, x: &Self::T, pool: Pool) -> Result<Self::T, TrainError>;
    /// `[N, C, H, W]` → `[N, C]` (mean over H and W).
    fn global_avg_pool(&mut self, x: &Self::T) -> Result<Self::T, TrainError>;
    /// `[N, …]` → `[N, product of the rest]`.
    fn flatten(&mut self, x: &Self::T) -> Result<Self::T, TrainError>;

    /// `[N, S, heads·d]` → `[N, heads, S, d]`.
    fn split_heads(&mut self, x: &Self::T, heads: i64) -> Result<Self::T, TrainError>;
    /// `[N, heads, S, d]` → `[N, S, heads·d]`.
    fn merge_heads(&mut self, x: &Self::T) -> Result<Self::T, TrainError>;
    /// `[N, S, H]` → `[N, H]`: the first token (BERT's pooler reads `[CLS]`).
    fn first_token(&mut self, x: &Self::T) -> Result<Self::T, TrainError>;
    /// Swaps the last two dimensions.
    fn transpose_last(&mut self, x: &Self::T) -> Result<Self::T, TrainError>;
    /// An int64 attention mask `[N, S]` (1 = token, 0 = padding) → an additive float bias
    /// `[N, 1, 1, S]`: 0 for tokens, the float32 minimum for padding (as HuggingFace BERT).
    fn attention_bias(&mut self, mask: &Self::T) -> Result<Self::T, TrainError>;
}
