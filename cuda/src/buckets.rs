//! Batch-size buckets. Every batch size an execution context sees costs one
//! instance: steps bound, tactics timed, a CUDA graph captured. A server sees
//! every size from 1 to its max batch, so with buckets on a batch of n runs
//! padded (zero rows) to the next power of two and its outputs are cut back to
//! n rows — at most log2(max) + 1 instances, all of which can be prepared at
//! load, so no request pays for a capture. The padding costs up to 2× compute
//! on a batch just above a power of two; a captured graph saves more than that
//! at the small sizes where padding is likely.

use kiln_engine::Tensor;

use crate::CudaError;

/// The bucket a batch of `n` runs in: the next power of two, at most `max`.
pub fn bucket(n: usize, max: usize) -> usize {
    n.checked_next_power_of_two().unwrap_or(max).min(max).max(n)
}

/// Every bucket up to `max` (1, 2, 4, …, and `max` itself).
pub fn all(max: usize) -> Vec<usize> {
    let mut out: Vec<usize> =
        std::iter::successors(Some(1usize), |&b| b.checked_mul(2)).take_while(|&b| b < max).collect();
    out.push(max.max(1));
    out
}

/// `inputs` with zero rows appended along axis 0 up to `to` rows.
pub fn pad(inputs: &[Tensor], to: usize) -> Result<Vec<Tensor>, CudaError> {
    inputs
        .iter()
        .map(|t| {
            let n = t.batch();
            if n >= to || t.shape().is_empty() {
                return Ok(t.clone());
            }
            let mut shape = t.shape().to_vec();
            shape[0] = to - n;
            let zeros = Tensor::zeros(t.dtype(), shape).map_err(|e| CudaError::InvalidArgument(e.to_string()))?;
            Tensor::concat_batch(&[t, &zeros]).map_err(|e| CudaError::InvalidArgument(e.to_string()))
        })
        .collect()
}

/// The first `n` rows of each output (the rest were padding).
pub fn trim(outputs: Vec<Tensor>, n: usize) -> Result<Vec<Tensor>, CudaError> {
    outputs
        .into_iter()
        .map(|t| {
            let total = t.batch();
            if t.shape().is_empty() || total <= n {
                return Ok(t);
            }
            let mut parts = t.split_batch(&[n, total - n]).map_err(|e| CudaError::InvalidArgument(e.to_string()))?;
            Ok(parts.swap_remove(0))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use kiln_engine::TensorData;

    use super::*;

    #[test]
    fn buckets_are_powers_of_two_capped_at_the_max() {
        assert_eq!([1, 2, 3, 5, 8, 9, 64].map(|n| bucket(n, 64)), [1, 2, 4, 8, 8, 16, 64]);
        assert_eq!(bucket(33, 48), 48);
        assert_eq!(all(64), vec![1, 2, 4, 8, 16, 32, 64]);
        assert_eq!(all(48), vec![1, 2, 4, 8, 16, 32, 48]);
        assert_eq!(all(1), vec![1]);
    }

    #[test]
    fn pad_then_trim_round_trips() -> Result<(), CudaError> {
        let t = Tensor::new(vec![3, 2], TensorData::F32(vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]))
            .map_err(|e| CudaError::InvalidArgument(e.to_string()))?;
        let ids = Tensor::new(vec![3, 1], TensorData::I64(vec![7, 8, 9]))
            .map_err(|e| CudaError::InvalidArgument(e.to_string()))?;
        let padded = pad(&[t.clone(), ids.clone()], 4)?;
        assert_eq!(padded[0].shape(), &[4, 2]);
        assert_eq!(padded[0].data(), &TensorData::F32(vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 0.0, 0.0]));
        assert_eq!(padded[1].data(), &TensorData::I64(vec![7, 8, 9, 0]));
        let back = trim(padded, 3)?;
        assert_eq!(back[0], t);
        assert_eq!(back[1], ids);
        Ok(())
    }
}
