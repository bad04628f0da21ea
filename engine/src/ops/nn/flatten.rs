//! Flatten: [d0, …, dn] → [d0·…·d(axis−1), d(axis)·…·dn], any dtype.

use crate::Tensor;
use crate::graph::{Node, ValueType, numel};
use crate::ops::util::{input, input_type};
use crate::ops::{InferInput, Inferred, OpDef};

#[derive(Debug)]
pub(crate) struct Flatten;

/// `axis` in `-rank..=rank` → `0..=rank`.
fn axis(node: &Node, rank: usize) -> Result<usize, String> {
    let a = node.attrs.int("axis", 1)?;
    let r = rank as i64;
    let n = if a < 0 { a + r } else { a };
    if (0..=r).contains(&n) { Ok(n as usize) } else { Err(format!("axis {a} out of range for rank {rank}")) }
}

impl OpDef for Flatten {
    fn name(&self) -> &'static str {
        "Flatten"
    }

    fn check(&self, node: &Node) -> Result<(), String> {
        node.attrs.int("axis", 1)?;
        if node.inputs.len() != 1 || node.outputs.len() != 1 {
            return Err("expects 1 input and 1 output".into());
        }
        Ok(())
    }

    fn infer(&self, node: &Node, inputs: &[InferInput<'_>]) -> Result<Vec<Inferred>, String> {
        let x = input_type(inputs, 0)?;
        let shape = match &x.shape {
            Some(s) => {
                let a = axis(node, s.len())?;
                Some(vec![numel(&s[..a]), numel(&s[a..])])
            }
            None => None,
        };
        Ok(vec![Inferred::new(ValueType { dtype: x.dtype, shape })])
    }

    fn eval(&self, node: &Node, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, String> {
        let x = input(inputs, 0)?;
        let a = axis(node, x.shape().len())?;
        let shape = vec![x.shape()[..a].iter().product(), x.shape()[a..].iter().product()];
        Ok(vec![Tensor::new(shape, x.data().clone()).map_err(|e| e.to_string())?])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::{Attr, Dim};
    use crate::ops::util::tensor_i64;
    use crate::{DType, TensorData};

    #[test]
    fn flattens_at_every_axis() -> Result<(), String> {
        let x = tensor_i64(vec![2, 3, 4], (0..24).collect())?;
        for (a, want) in [(0, [1, 24]), (1, [2, 12]), (2, [6, 4]), (3, [24, 1]), (-1, [6, 4]), (-3, [1, 24])] {
            let node = Node::new("f", "Flatten", vec![Some(0)], vec![1]).with_attr("axis", Attr::Int(a));
            let y = Flatten.eval(&node, &[Some(&x)])?;
            assert_eq!(y[0].shape(), &want);
            assert_eq!(y[0].data(), &TensorData::I64((0..24).collect()));
        }
        let node = Node::new("f", "Flatten", vec![Some(0)], vec![1]).with_attr("axis", Attr::Int(4));
        assert!(Flatten.eval(&node, &[Some(&x)]).is_err());
        Ok(())
    }

    #[test]
    fn infer_multiplies_symbolic_dims() -> Result<(), String> {
        let node = Node::new("f", "Flatten", vec![Some(0)], vec![1]);
        let t = ValueType::new(DType::F32, vec![Dim::sym("batch"), 512.into(), 1.into(), 1.into()]);
        let out = Flatten.infer(&node, &[InferInput { ty: Some(&t), ..Default::default() }])?;
        assert_eq!(out[0].ty, ValueType::new(DType::F32, vec![Dim::sym("batch"), 512.into()]));
        let node = node.with_attr("axis", Attr::Int(2));
        let t = ValueType::new(DType::F32, vec![Dim::sym("batch"), 3.into(), 4.into()]);
        let out = Flatten.infer(&node, &[InferInput { ty: Some(&t), ..Default::default() }])?;
        assert_eq!(out[0].ty.shape, Some(vec![Dim::sym("batch").mul(&Dim::fixed(3)), 4.into()]));
        Ok(())
    }
}
