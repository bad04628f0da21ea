//! MatMul with numpy semantics: batched, broadcasting batch axes, 1-D operands
//! promoted to matrices and the promoted axis dropped again.

use super::linalg::matmul;
use crate::graph::{Dim, Node, Shape, ValueType};
use crate::ops::util::{broadcast_shapes, expect_f32, f32s, input, input_shape, input_type, tensor_f32};
use crate::ops::{InferInput, Inferred, OpDef};
use crate::{DType, Tensor};

#[derive(Debug)]
pub(crate) struct MatMul;

/// Symbolic numpy matmul shape.
pub(crate) fn matmul_shape(a: &[Dim], b: &[Dim]) -> Result<Shape, String> {
    if a.is_empty() || b.is_empty() {
        return Err("matmul operands must have rank >= 1".into());
    }
    let one = Dim::fixed(1);
    let a2: Vec<Dim> = if a.len() == 1 { vec![one.clone(), a[0].clone()] } else { a.to_vec() };
    let b2: Vec<Dim> = if b.len() == 1 { vec![b[0].clone(), one] } else { b.to_vec() };
    let (ka, kb) = (&a2[a2.len() - 1], &b2[b2.len() - 2]);
    if let (Some(x), Some(y)) = (ka.as_fixed(), kb.as_fixed())
        && x != y
    {
        return Err(format!("inner dimensions {x} and {y} differ"));
    }
    let mut out = broadcast_shapes(&a2[..a2.len() - 2], &b2[..b2.len() - 2])?;
    if a.len() > 1 {
        out.push(a2[a2.len() - 2].clone());
    }
    if b.len() > 1 {
        out.push(b2[b2.len() - 1].clone());
    }
    Ok(out)
}

impl OpDef for MatMul {
    fn name(&self) -> &'static str {
        "MatMul"
    }

    fn check(&self, node: &Node) -> Result<(), String> {
        if node.inputs.len() != 2 || node.outputs.len() != 1 {
            return Err("expects 2 inputs and 1 output".into());
        }
        Ok(())
    }

    fn infer(&self, _node: &Node, inputs: &[InferInput<'_>]) -> Result<Vec<Inferred>, String> {
        expect_f32(input_type(inputs, 0)?)?;
        expect_f32(input_type(inputs, 1)?)?;
        let shape = match (input_shape(inputs, 0), input_shape(inputs, 1)) {
            (Some(a), Some(b)) => Some(matmul_shape(a, b)?),
            _ => None,
        };
        Ok(vec![Inferred::new(ValueType { dtype: DType::F32, shape })])
    }

    fn eval(&self, _node: &Node, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, String> {
        let (a, b) = (input(inputs, 0)?, input(inputs, 1)?);
        let (shape, y) = matmul(f32s(a)?, a.shape(), f32s(b)?, b.shape())?;
        Ok(vec![tensor_f32(shape, y)?])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::nn::linalg::tests::{Lcg, assert_close};

    #[test]
    fn eval_broadcasts_like_numpy() -> Result<(), String> {
        let mut r = Lcg(21);
        let node = Node::new("mm", "MatMul", vec![Some(0), Some(1)], vec![2]);
        // [2, 1, 3, 4] × [5, 4, 2] → [2, 5, 3, 2]: both sides broadcast.
        let (a, b) = (r.vec(24), r.vec(40));
        let y = MatMul.eval(
            &node,
            &[Some(&tensor_f32(vec![2, 1, 3, 4], a.clone())?), Some(&tensor_f32(vec![5, 4, 2], b.clone())?)],
        )?;
        assert_eq!(y[0].shape(), &[2, 5, 3, 2]);
        let mut want = Vec::new();
        for i in 0..2 {
            for j in 0..5 {
                for row in 0..3 {
                    for col in 0..2 {
                        want.push((0..4).map(|p| a[i * 12 + row * 4 + p] * b[j * 8 + p * 2 + col]).sum::<f32>());
                    }
                }
            }
        }
        assert_close(f32s(&y[0])?, &want, 1e-5);
        // [batch·seq, 384]-style: 3-D activations × 2-D weights.
        let (a, b) = (r.vec(2 * 3 * 4), r.vec(4 * 5));
        let y = MatMul
            .eval(&node, &[Some(&tensor_f32(vec![2, 3, 4], a.clone())?), Some(&tensor_f32(vec![4, 5], b.clone())?)])?;
        assert_eq!(y[0].shape(), &[2, 3, 5]);
        let want: Vec<f32> = (0..6)
            .flat_map(|r| (0..5).map(move |c| (r, c)))
            .map(|(r, c)| (0..4).map(|p| a[r * 4 + p] * b[p * 5 + c]).sum())
            .collect();
        assert_close(f32s(&y[0])?, &want, 1e-5);
        assert!(
            MatMul
                .eval(&node, &[Some(&tensor_f32(vec![2, 3], r.vec(6))?), Some(&tensor_f32(vec![2, 3], r.vec(6))?)])
                .is_err()
        );
        Ok(())
    }

    #[test]
    fn infer_handles_symbolic_batch_and_vectors() -> Result<(), String> {
        let node = Node::new("mm", "MatMul", vec![Some(0), Some(1)], vec![2]);
        let infer = |a: Vec<Dim>, b: Vec<Dim>| -> Result<Option<Shape>, String> {
            let (ta, tb) = (ValueType::new(DType::F32, a), ValueType::new(DType::F32, b));
            let ins = [
                InferInput { ty: Some(&ta), ..Default::default() },
                InferInput { ty: Some(&tb), ..Default::default() },
            ];
            Ok(MatMul.infer(&node, &ins)?.remove(0).ty.shape)
        };
        let (batch, seq) = (Dim::sym("batch"), Dim::sym("seq"));
        assert_eq!(
            infer(vec![batch.clone(), seq.clone(), 384.into()], vec![384.into(), 1536.into()])?,
            Some(vec![batch.clone(), seq.clone(), 1536.into()])
        );
        assert_eq!(
            infer(
                vec![batch.clone(), 12.into(), seq.clone(), 32.into()],
                vec![batch.clone(), 12.into(), 32.into(), seq.clone()]
            )?,
            Some(vec![batch.clone(), 12.into(), seq.clone(), seq.clone()])
        );
        assert_eq!(
            infer(vec![4.into()], vec![batch.clone(), 4.into(), 7.into()])?,
            Some(vec![batch.clone(), 7.into()])
        );
        assert_eq!(infer(vec![3.into(), 4.into()], vec![4.into()])?, Some(vec![3.into()]));
        assert!(infer(vec![3.into(), 4.into()], vec![5.into(), 2.into()]).is_err());
        Ok(())
    }
}
