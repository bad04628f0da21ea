//! GatherND (with batch_dims): gathers slices of `data` addressed by the last
//! axis of `indices`.

use crate::graph::{Dim, Node, ValueType};
use crate::ops::util::{input, input_type, ints};
use crate::ops::{InferInput, Inferred, OpDef};
use crate::{Tensor, TensorData};

pub(super) struct GatherNd;

impl OpDef for GatherNd {
    fn name(&self) -> &'static str {
        "GatherND"
    }

    fn infer(&self, node: &Node, inputs: &[InferInput<'_>]) -> Result<Vec<Inferred>, String> {
        let (data, idx) = (input_type(inputs, 0)?, input_type(inputs, 1)?);
        let b = usize::try_from(node.attrs.int("batch_dims", 0)?).map_err(|_| "negative batch_dims")?;
        let shape = match (&data.shape, &idx.shape) {
            (Some(d), Some(i)) => {
                let k = i.last().and_then(Dim::as_fixed).and_then(|k| usize::try_from(k).ok());
                match k {
                    Some(k) if b + k <= d.len() && !i.is_empty() => {
                        let mut s: Vec<Dim> = i[..i.len() - 1].to_vec();
                        s.extend_from_slice(&d[b + k..]);
                        Some(s)
                    }
                    Some(_) => return Err(format!("indices {i:?} address more axes than data {d:?} has")),
                    None => None,
                }
            }
            _ => None,
        };
        Ok(vec![Inferred::new(ValueType { dtype: data.dtype, shape })])
    }

    fn eval(&self, node: &Node, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, String> {
        let (data, indices) = (input(inputs, 0)?, input(inputs, 1)?);
        let b = usize::try_from(node.attrs.int("batch_dims", 0)?).map_err(|_| "negative batch_dims")?;
        let (ds, is) = (data.shape(), indices.shape());
        let k = *is.last().ok_or("indices must have rank ≥ 1")?;
        if b + k > ds.len() || b >= is.len() && b > 0 || ds[..b] != is[..b] {
            return Err(format!("indices {is:?} do not fit data {ds:?} with batch_dims {b}"));
        }
        let idx = ints(indices)?;
        let batch: usize = ds[..b].iter().product();
        let slice: usize = ds[b + k..].iter().product();
        let per_batch_data: usize = ds[b..].iter().product();
        let lookups = idx.len() / k.max(1);
        let per_batch_lookups = lookups / batch.max(1);
        let mut picks = Vec::with_capacity(lookups);
        for l in 0..lookups {
            let mut off = (l / per_batch_lookups.max(1)) * per_batch_data;
            let mut stride = per_batch_data;
            for (a, &raw) in idx[l * k..(l + 1) * k].iter().enumerate() {
                let n = ds[b + a];
                stride /= n.max(1);
                let i = if raw < 0 { raw + n as i64 } else { raw };
                if !(0..n as i64).contains(&i) {
                    return Err(format!("index {raw} out of range for axis of size {n}"));
                }
                off += i as usize * stride;
            }
            picks.push(off);
        }
        let mut shape = is[..is.len() - 1].to_vec();
        shape.extend_from_slice(&ds[b + k..]);
        fn gather<T: Clone>(v: &[T], picks: &[usize], slice: usize) -> Vec<T> {
            picks.iter().flat_map(|&o| v[o..o + slice].iter().cloned()).collect()
        }
        let out = match data.data() {
            TensorData::F32(v) => TensorData::F32(gather(v, &picks, slice)),
            TensorData::I64(v) => TensorData::I64(gather(v, &picks, slice)),
            TensorData::I32(v) => TensorData::I32(gather(v, &picks, slice)),
            TensorData::Bool(v) => TensorData::Bool(gather(v, &picks, slice)),
            _ => return Err(format!("GatherND of {} is not supported", data.dtype())),
        };
        Ok(vec![Tensor::new(shape, out).map_err(|e| e.to_string())?])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::util::{f32s, tensor_f32, tensor_i64};

    #[test]
    fn gathers_like_the_onnx_examples() -> Result<(), String> {
        let data = tensor_f32(vec![2, 2], vec![0., 1., 2., 3.])?;
        let node = Node::new("n", "GatherND", vec![], vec![]);
        let idx = tensor_i64(vec![2, 2], vec![0, 0, 1, 1])?;
        assert_eq!(f32s(&GatherNd.eval(&node, &[Some(&data), Some(&idx)])?[0])?, &[0., 3.]);
        let rows = tensor_i64(vec![2, 1], vec![1, 0])?;
        let out = GatherNd.eval(&node, &[Some(&data), Some(&rows)])?;
        assert_eq!(out[0].shape(), &[2, 2]);
        assert_eq!(f32s(&out[0])?, &[2., 3., 0., 1.]);
        // batch_dims = 1: data [2,2,2], indices [2,1] picks row i of batch b.
        let d3 = tensor_f32(vec![2, 2, 2], (0..8).map(|x| x as f32).collect())?;
        let bnode = Node::new("n", "GatherND", vec![], vec![]).with_attr("batch_dims", crate::graph::Attr::Int(1));
        let bi = tensor_i64(vec![2, 1], vec![1, 0])?;
        let out = GatherNd.eval(&bnode, &[Some(&d3), Some(&bi)])?;
        assert_eq!(out[0].shape(), &[2, 2]);
        assert_eq!(f32s(&out[0])?, &[2., 3., 4., 5.]);
        let bad = tensor_i64(vec![1, 2], vec![0, 2])?;
        assert!(GatherNd.eval(&node, &[Some(&data), Some(&bad)]).is_err());
        Ok(())
    }
}
