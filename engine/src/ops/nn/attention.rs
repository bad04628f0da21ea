//! kiln.Attention: Y = softmax(Q·Kᵀ·scale + M, last axis)·V with Q [B,H,S,D],
//! KT [B,H,D,Sk] (K already transposed, as exporters produce it), V [B,H,Sk,Dv]
//! and an optional additive mask M broadcastable to [B,H,S,Sk]. Leading axes
//! broadcast like MatMul's, so other ranks ≥ 2 work too.
//! With `zero_masked_rows` = 1 (set when the exporter's NaN guard was fused) a
//! row whose scores are all -inf gives zeros; otherwise NaN, as Softmax does.

use rayon::prelude::*;

use super::linalg::matmul;
use super::matmul::matmul_shape;
use crate::graph::{Node, ValueType};
use crate::ops::math::softmax::softmax_row;
use crate::ops::util::{
    broadcast_dims, broadcast_shapes, broadcast_strides, expect_f32, f32s, input, input_shape, input_type, tensor_f32,
};
use crate::ops::{InferInput, Inferred, OpDef};
use crate::{DType, Tensor};

#[derive(Debug)]
pub(crate) struct Attention;

impl OpDef for Attention {
    fn name(&self) -> &'static str {
        "kiln.Attention"
    }

    fn check(&self, node: &Node) -> Result<(), String> {
        node.attrs.float("scale", 1.0)?;
        if !(3..=4).contains(&node.inputs.len()) || node.outputs.len() != 1 {
            return Err("expects 3 or 4 inputs (Q, KT, V, mask?) and 1 output".into());
        }
        Ok(())
    }

    fn infer(&self, _node: &Node, inputs: &[InferInput<'_>]) -> Result<Vec<Inferred>, String> {
        for i in 0..3 {
            expect_f32(input_type(inputs, i)?)?;
        }
        let (Some(q), Some(kt), Some(v)) = (input_shape(inputs, 0), input_shape(inputs, 1), input_shape(inputs, 2))
        else {
            return Ok(vec![Inferred::new(ValueType { dtype: DType::F32, shape: None })]);
        };
        if q.len() < 2 || kt.len() < 2 || v.len() < 2 {
            return Err("Q, KT and V must have rank >= 2".into());
        }
        let scores = matmul_shape(q, kt)?;
        if let Some(m) = input_shape(inputs, 3) {
            broadcast_shapes(&scores, m)?;
        }
        Ok(vec![Inferred::new(ValueType::new(DType::F32, matmul_shape(&scores, v)?))])
    }

    fn eval(&self, node: &Node, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, String> {
        let (q, kt, v) = (input(inputs, 0)?, input(inputs, 1)?, input(inputs, 2)?);
        if q.shape().len() < 2 || kt.shape().len() < 2 || v.shape().len() < 2 {
            return Err("Q, KT and V must have rank >= 2".into());
        }
        let scale = node.attrs.float("scale", 1.0)?;
        let zero_masked_rows = node.attrs.int("zero_masked_rows", 0)? != 0;
        let (shape, mut scores) = matmul(f32s(q)?, q.shape(), f32s(kt)?, kt.shape())?;
        let rank = shape.len();
        let sk = shape[rank - 1];
        // Mask element of score (row r, column j): moff(r) + j·mstep.
        let mask = match inputs.get(3).copied().flatten() {
            Some(m) => {
                if broadcast_dims(&shape, m.shape())? != shape {
                    return Err(format!("mask {:?} does not broadcast to the scores {shape:?}", m.shape()));
                }
                Some((f32s(m)?, broadcast_strides(m.shape(), &shape)))
            }
            None => None,
        };
        if sk > 0 {
            scores.par_chunks_mut(sk).enumerate().for_each(|(r, row)| {
                if let Some((ms, st)) = &mask {
                    let (mut rem, mut moff) = (r, 0);
                    for d in (0..rank - 1).rev() {
                        moff += (rem % shape[d]) * st[d];
                        rem /= shape[d];
                    }
                    let mstep = st[rank - 1];
                    let mut j = 0;
                    while j < sk {
                        row[j] = row[j] * scale + ms[moff + j * mstep];
                        j += 1;
                    }
                } else {
                    let mut j = 0;
                    while j < sk {
                        row[j] *= scale;
                        j += 1;
                    }
                }
                if zero_masked_rows && row.iter().all(|&x| x == f32::NEG_INFINITY) {
                    row.fill(0.0);
                } else {
                    softmax_row(row);
                }
            });
        }
        let (out_shape, y) = matmul(&scores, &shape, f32s(v)?, v.shape())?;
        Ok(vec![tensor_f32(out_shape, y)?])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::{Attr, Dim};
    use crate::ops::nn::linalg::tests::{Lcg, assert_close};

    #[test]
    fn matches_naive_attention_with_mask() -> Result<(), String> {
        let mut r = Lcg(17);
        let (b, h, s, sk, d, dv) = (2, 3, 4, 5, 6, 7);
        let (q, kt, v) = (r.vec(b * h * s * d), r.vec(b * h * d * sk), r.vec(b * h * sk * dv));
        // Mask [B, 1, 1, Sk]: the last key of the second batch item masked out.
        let mut mask = vec![0.0; b * sk];
        mask[b * sk - 1] = -10000.0;
        let scale = 0.4;
        let node = Node::new("a", "kiln.Attention", (0..4).map(Some).collect(), vec![4])
            .with_attr("scale", Attr::Float(scale));
        Attention.check(&node)?;
        let ins = [
            tensor_f32(vec![b, h, s, d], q.clone())?,
            tensor_f32(vec![b, h, d, sk], kt.clone())?,
            tensor_f32(vec![b, h, sk, dv], v.clone())?,
            tensor_f32(vec![b, 1, 1, sk], mask.clone())?,
        ];
        let y = Attention.eval(&node, &ins.iter().map(Some).collect::<Vec<_>>())?;
        assert_eq!(y[0].shape(), &[b, h, s, dv]);
        let mut want = Vec::new();
        for bh in 0..b * h {
            for i in 0..s {
                let mut p: Vec<f32> = (0..sk)
                    .map(|j| {
                        (0..d).map(|t| q[(bh * s + i) * d + t] * kt[(bh * d + t) * sk + j]).sum::<f32>() * scale
                            + mask[(bh / h) * sk + j]
                    })
                    .collect();
                let m = p.iter().cloned().fold(f32::MIN, f32::max);
                let e: Vec<f32> = p.iter().map(|x| (x - m).exp()).collect();
                let total: f32 = e.iter().sum();
                for (pj, ej) in p.iter_mut().zip(&e) {
                    *pj = ej / total;
                }
                if bh / h == 1 {
                    assert!(p[sk - 1] < 1e-6);
                }
                for c in 0..dv {
                    want.push((0..sk).map(|j| p[j] * v[(bh * sk + j) * dv + c]).sum());
                }
            }
        }
        assert_close(f32s(&y[0])?, &want, 1e-5);
        let bad_mask = tensor_f32(vec![b, h, s, sk + 1], r.vec(b * h * s * (sk + 1)))?;
        assert!(Attention.eval(&node, &[Some(&ins[0]), Some(&ins[1]), Some(&ins[2]), Some(&bad_mask)]).is_err());
        Ok(())
    }

    #[test]
    fn fully_masked_rows_give_zeros_only_when_guarded() -> Result<(), String> {
        let plain =
            Node::new("a", "kiln.Attention", (0..4).map(Some).collect(), vec![4]).with_attr("scale", Attr::Float(1.0));
        let node = plain.clone().with_attr("zero_masked_rows", Attr::Int(1));
        let ones = |n| vec![1.0f32; n];
        let ins = [
            tensor_f32(vec![1, 1, 2, 2], ones(4))?,
            tensor_f32(vec![1, 1, 2, 2], ones(4))?,
            tensor_f32(vec![1, 1, 2, 2], vec![1.0, 2.0, 3.0, 4.0])?,
            // Query row 0 may see nothing, row 1 sees both keys.
            tensor_f32(vec![1, 1, 2, 2], vec![f32::NEG_INFINITY, f32::NEG_INFINITY, 0.0, 0.0])?,
        ];
        let y = Attention.eval(&node, &ins.iter().map(Some).collect::<Vec<_>>())?;
        assert_eq!(f32s(&y[0])?, &[0.0, 0.0, 2.0, 3.0]);
        // Unguarded, a fully masked row is NaN, as the unfused Softmax gives.
        let y = Attention.eval(&plain, &ins.iter().map(Some).collect::<Vec<_>>())?;
        assert!(f32s(&y[0])?[..2].iter().all(|x| x.is_nan()));
        Ok(())
    }

    #[test]
    fn infer_symbolic_shapes() -> Result<(), String> {
        let node = Node::new("a", "kiln.Attention", (0..4).map(Some).collect(), vec![4]);
        let (bt, sq) = (Dim::sym("batch"), Dim::sym("seq"));
        let q = ValueType::new(DType::F32, vec![bt.clone(), 12.into(), sq.clone(), 32.into()]);
        let kt = ValueType::new(DType::F32, vec![bt.clone(), 12.into(), 32.into(), sq.clone()]);
        let v = ValueType::new(DType::F32, vec![bt.clone(), 12.into(), sq.clone(), 32.into()]);
        let m = ValueType::new(DType::F32, vec![bt.clone(), 1.into(), 1.into(), sq.clone()]);
        let ins: Vec<InferInput<'_>> =
            [&q, &kt, &v, &m].iter().map(|t| InferInput { ty: Some(t), ..Default::default() }).collect();
        assert_eq!(Attention.infer(&node, &ins)?[0].ty.shape, Some(vec![bt, 12.into(), sq, 32.into()]));
        assert!(Attention.check(&Node::new("a", "kiln.Attention", vec![Some(0), Some(1)], vec![2])).is_err());
        Ok(())
    }
}
