//! Gradient buckets: which gradients travel together, and the flatten / scatter-back around one collective call.

use std::ops::Range;

use tch::{Kind, Tensor};

use crate::TrainError;

/// Bytes per element on the wire: every bucket is reduced in f32, whatever the gradients' own dtype.
pub(super) const WIRE_ELEMENT_BYTES: usize = 4;

/// The gradient of `param` to average, or `None` for a frozen parameter (one that does not require grad).
///
/// A trainable parameter without a gradient (unused in this step's forward, perhaps on this rank only) gets one
/// of zeros, so that every rank packs the same buckets; the returned handle shares the parameter's `.grad()`
/// storage, so writing into it updates the gradient in place.
pub(super) fn gradient(param: &Tensor) -> Result<Option<Tensor>, TrainError> {
    if !param.defined() || !param.requires_grad() {
        return Ok(None);
    }
    let grad = param.f_grad()?;
    if grad.defined() {
        return Ok(Some(grad));
    }
    // libtorch has no setter for `.grad`; a backward pass through `0 · p` is the public way to make one, and its
    // gradient is exactly zero whatever `p` holds (even inf/NaN), since d(0·p)/dp = 0.
    tch::with_grad(|| param.f_mul_scalar(0.0)?.f_sum(None::<Kind>)?.f_backward())?;
    let grad = param.f_grad()?;
    if !grad.defined() {
        return Err(TrainError::Distributed(
            "a trainable parameter still has no gradient after a zero backward pass (is it a non-leaf tensor?)".into(),
        ));
    }
    Ok(Some(grad))
}

/// Splits tensors of `bytes[i]` bytes, in order, into consecutive buckets of at most `bucket_bytes` each; a
/// tensor bigger than `bucket_bytes` gets a bucket of its own. Empty tensors ride along with their neighbours.
pub(super) fn plan(bytes: &[usize], bucket_bytes: usize) -> Vec<Range<usize>> {
    let mut buckets = Vec::new();
    let mut start = 0;
    let mut filled = 0usize;
    for (i, &b) in bytes.iter().enumerate() {
        if i > start && filled.saturating_add(b) > bucket_bytes {
            buckets.push(start..i);
            start = i;
            filled = 0;
        }
        filled = filled.saturating_add(b);
    }
    if start < bytes.len() {
        buckets.push(start..bytes.len());
    }
    buckets
}

/// Wire size of each gradient (f32 elements).
pub(super) fn wire_bytes(grads: &[Tensor]) -> Vec<usize> {
    grads.iter().map(|g| g.numel().saturating_mul(WIRE_ELEMENT_BYTES)).collect()
}

/// One contiguous 1-D f32 tensor holding `grads` back to back, on their device.
pub(super) fn flatten(grads: &[Tensor]) -> Result<Tensor, TrainError> {
    let flats = grads.iter().map(|g| g.f_to_kind(Kind::Float)?.f_reshape([-1])).collect::<Result<Vec<_>, _>>()?;
    // `cat` always allocates, so the bucket never aliases a gradient, and its output is contiguous.
    Ok(Tensor::f_cat(&flats, 0)?)
}

/// Copies consecutive slices of the 1-D `flat` back into `grads` (converting to each gradient's dtype).
pub(super) fn scatter_back(flat: &Tensor, grads: &[Tensor]) -> Result<(), TrainError> {
    let _no_grad = tch::no_grad_guard();
    let mut offset = 0i64;
    for grad in grads {
        let len =
            i64::try_from(grad.numel()).map_err(|_| TrainError::Distributed("gradient too large to index".into()))?;
        let piece = flat.f_narrow(0, offset, len)?.f_view_as(grad)?;
        grad.shallow_clone().f_copy_(&piece)?;
        offset += len;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::plan;

    #[test]
    fn buckets_fill_greedily_and_big_tensors_go_alone() {
        assert!(plan(&[], 16).is_empty());
        assert_eq!(plan(&[4, 4, 4, 4, 4], 8), vec![0..2, 2..4, 4..5]);
        assert_eq!(plan(&[4, 40, 4], 8), vec![0..1, 1..2, 2..3]);
        assert_eq!(plan(&[40], 8), vec![0..1]);
        assert_eq!(plan(&[0, 8, 0, 0, 4], 8), vec![0..4, 4..5]);
        assert_eq!(plan(&[4, 4, 4], usize::MAX), vec![0..3]);
    }
}
