//! Shape (opset 15 `start`/`end`). Its output is the root of every shape
//! subgraph: inference records the dims, symbolic ones included, as `sym`.

use crate::graph::{Dim, Node, ValueType};
use crate::ops::util::{input, input_type, tensor_i64};
use crate::ops::{InferInput, Inferred, OpDef};
use crate::{DType, Tensor};

use super::fresh;

pub struct ShapeOp;

/// The `start..end` range of axes, clamped like ONNX.
fn range(node: &Node, rank: usize) -> Result<std::ops::Range<usize>, String> {
    let r = rank as i64;
    let clamp = |v: i64| (if v < 0 { v + r } else { v }).clamp(0, r) as usize;
    let start = clamp(node.attrs.int("start", 0)?);
    let end = clamp(node.attrs.int("end", r)?);
    Ok(start..end.max(start))
}

impl OpDef for ShapeOp {
    fn name(&self) -> &'static str {
        "Shape"
    }

    fn check(&self, node: &Node) -> Result<(), String> {
        node.attrs.int("start", 0)?;
        node.attrs.int("end", 0).map(drop)
    }

    fn infer(&self, node: &Node, inputs: &[InferInput<'_>]) -> Result<Vec<Inferred>, String> {
        let x = input_type(inputs, 0)?;
        let Some(s) = &x.shape else {
            return Ok(vec![Inferred::new(ValueType::new(DType::I64, vec![fresh(node, 0)]))]);
        };
        let dims: Vec<Dim> = s[range(node, s.len())?].to_vec();
        Ok(vec![Inferred::with_sym(ValueType::new(DType::I64, vec![Dim::fixed(dims.len() as i64)]), dims)])
    }

    fn eval(&self, node: &Node, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, String> {
        let x = input(inputs, 0)?;
        let dims: Vec<i64> = x.shape()[range(node, x.shape().len())?].iter().map(|&d| d as i64).collect();
        Ok(vec![tensor_i64(vec![dims.len()], dims)?])
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::*;
    use crate::DType;
    use crate::graph::Attr;
    use crate::ops::InferInput;
    use crate::ops::util::i64s;

    #[test]
    fn shape_with_start_and_end() -> Result<(), String> {
        let x = f32t(&[2, 3, 4], &[0.; 24]);
        assert_eq!(i64s(&eval(&node("Shape", 1, &[]), &[&x])?)?, &[2, 3, 4]);
        let tail = node("Shape", 1, &[("start", Attr::Int(-2))]);
        assert_eq!(i64s(&eval(&tail, &[&x])?)?, &[3, 4]);
        let mid = node("Shape", 1, &[("start", Attr::Int(1)), ("end", Attr::Int(-1))]);
        assert_eq!(i64s(&eval(&mid, &[&x])?)?, &[3]);
        let clamped = node("Shape", 1, &[("start", Attr::Int(-10)), ("end", Attr::Int(10))]);
        assert_eq!(i64s(&eval(&clamped, &[&x])?)?, &[2, 3, 4]);
        let empty = node("Shape", 1, &[("start", Attr::Int(2)), ("end", Attr::Int(1))]);
        assert_eq!(eval(&empty, &[&x])?.shape(), &[0]);
        let scalar = f32t(&[], &[1.]);
        assert_eq!(eval(&node("Shape", 1, &[]), &[&scalar])?.shape(), &[0]);
        Ok(())
    }

    #[test]
    fn shape_records_symbolic_dims() -> Result<(), String> {
        let xt = sym_ty(DType::F32, vec![d("batch"), d("seq"), f(384)]);
        let x = InferInput { ty: Some(&xt), ..Default::default() };
        let out = infer(&node("Shape", 1, &[]), &[x])?;
        assert_eq!(out.ty, sym_ty(DType::I64, vec![f(3)]));
        assert_eq!(out.sym, Some(vec![d("batch"), d("seq"), f(384)]));
        let out = infer(&node("Shape", 1, &[("end", Attr::Int(1))]), &[x])?;
        assert_eq!(out.sym, Some(vec![d("batch")]));
        Ok(())
    }
}
