//! [`Ops`] computed by libtorch: the interpreter used for training and evaluation.

use tch::{Kind, Tensor};

use crate::error::TrainError;
use crate::ops::{BatchNorm, Conv2d, LayerNorm, Linear, Ops, Param, Pool};

/// Runs a model's forward pass in libtorch. `train` switches dropout and batch-norm
/// to their training behaviour (batch statistics, running-statistics update).
#[derive(Debug, Clone, Copy)]
pub struct Eager {
    pub train: bool,
}

impl Eager {
    pub fn train() -> Self {
        Eager { train: true }
    }

    pub fn eval() -> Self {
        Eager { train: false }
    }
}

impl Ops for Eager {
    type T = Tensor;

    fn conv2d(&mut self, x: &Tensor, c: &Conv2d) -> Result<Tensor, TrainError> {
        Ok(x.f_conv2d(
            &c.weight.tensor,
            c.bias.as_ref().map(|b| &b.tensor),
            [c.stride, c.stride],
            [c.padding, c.padding],
            [1, 1],
            c.groups,
        )?)
    }

    fn batch_norm(&mut self, x: &Tensor, bn: &BatchNorm) -> Result<Tensor, TrainError> {
        Ok(x.f_batch_norm(
            Some(&bn.weight.tensor),
            Some(&bn.bias.tensor),
            Some(&bn.running_mean.tensor),
            Some(&bn.running_var.tensor),
            self.train,
            bn.momentum,
            bn.eps,
            true,
        )?)
    }

    fn linear(&mut self, x: &Tensor, fc: &Linear) -> Result<Tensor, TrainError> {
        Ok(x.f_linear(&fc.weight.tensor, fc.bias.as_ref().map(|b| &b.tensor))?)
    }

    fn layer_norm(&mut self, x: &Tensor, ln: &LayerNorm) -> Result<Tensor, TrainError> {
        let dim = ln.weight.tensor.size();
        Ok(x.f_layer_norm(dim.as_slice(), Some(&ln.weight.tensor), Some(&ln.bias.tensor), ln.eps, true)?)
    }

    fn embedding(&mut self, ids: &Tensor, table: &Param) -> Result<Tensor, TrainError> {
        Ok(Tensor::f_embedding(&table.tensor, ids, -1, false, false)?)
    }

    fn position_embedding(&mut self, like: &Tensor, table: &Param) -> Result<Tensor, TrainError> {
        let seq = dim(like, 1)?;
        Ok(table.tensor.f_narrow(0, 0, seq)?.f_unsqueeze(0)?)
    }

    fn relu(&mut self, x: &Tensor) -> Result<Tensor, TrainError> {
        Ok(x.f_relu()?)
    }

    fn gelu(&mut self, x: &Tensor) -> Result<Tensor, TrainError> {
        Ok(x.f_gelu("none")?)
    }

    fn tanh(&mut self, x: &Tensor) -> Result<Tensor, TrainError> {
        Ok(x.f_tanh()?)
    }

    fn add(&mut self, a: &Tensor, b: &Tensor) -> Result<Tensor, TrainError> {
        Ok(a.f_add(b)?)
    }

    fn scale(&mut self, x: &Tensor, factor: f64) -> Result<Tensor, TrainError> {
        Ok(x.f_mul_scalar(factor)?)
    }

    fn matmul(&mut self, a: &Tensor, b: &Tensor) -> Result<Tensor, TrainError> {
        Ok(a.f_matmul(b)?)
    }

    fn softmax(&mut self, x: &Tensor) -> Result<Tensor, TrainError> {
        Ok(x.f_softmax(-1, None::<Kind>)?)
    }

    fn dropout(&mut self, x: &Tensor, p: f64) -> Result<Tensor, TrainError> {
        if !self.train || p == 0.0 {
            return Ok(x.shallow_clone());
        }
        Ok(x.f_dropout(p, true)?)
    }

    fn max_pool2d(&mut self, x: &Tensor, p: Pool) -> Result<Tensor, TrainError> {
        Ok(x.f_max_pool2d([p.kernel, p.kernel], [p.stride, p.stride], [p.padding, p.padding], [1, 1], false)?)
    }

    fn global_avg_pool(&mut self, x: &Tensor) -> Result<Tensor, TrainError> {
        Ok(x.f_mean_dim([-2i64, -1].as_slice(), false, None::<Kind>)?)
    }

    fn flatten(&mut self, x: &Tensor) -> Result<Tensor, TrainError> {
        Ok(x.f_flatten(1, -1)?)
    }

    fn split_heads(&mut self, x: &Tensor, heads: i64) -> Result<Tensor, TrainError> {
        let (n, s, h) = (dim(x, 0)?, dim(x, 1)?, dim(x, 2)?);
        Ok(x.f_view([n, s, heads, h / heads])?.f_transpose(1, 2)?)
    }

    fn merge_heads(&mut self, x: &Tensor) -> Result<Tensor, TrainError> {
        let (n, heads, s, d) = (dim(x, 0)?, dim(x, 1)?, dim(x, 2)?, dim(x, 3)?);
        Ok(x.f_transpose(1, 2)?.f_contiguous()?.f_view([n, s, heads * d])?)
    }

    fn first_token(&mut self, x: &Tensor) -> Result<Tensor, TrainError> {
        Ok(x.f_select(1, 0)?)
    }

    fn transpose_last(&mut self, x: &Tensor) -> Result<Tensor, TrainError> {
        Ok(x.f_transpose(-2, -1)?)
    }

    fn attention_bias(&mut self, mask: &Tensor) -> Result<Tensor, TrainError> {
        let keep = mask.f_to_kind(Kind::Float)?.f_unsqueeze(1)?.f_unsqueeze(1)?;
        Ok(keep.f_neg()?.f_add_scalar(1.0)?.f_mul_scalar(f64::from(f32::MIN))?)
    }
}

fn dim(x: &Tensor, i: usize) -> Result<i64, TrainError> {
    x.size()
        .get(i)
        .copied()
        .ok_or_else(|| TrainError::Shape(format!("expected at least {} dims, got {:?}", i + 1, x.size())))
}
