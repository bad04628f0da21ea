//! Not: logical negation of a BOOL tensor.

use crate::graph::{Node, ValueType};
use crate::ops::util::{input, input_type, tensor_bool};
use crate::ops::{InferInput, Inferred, OpDef};
use crate::{DType, Tensor, TensorData};

pub struct Not;

impl OpDef for Not {
    fn name(&self) -> &'static str {
        "Not"
    }

    fn infer(&self, _node: &Node, inputs: &[InferInput<'_>]) -> Result<Vec<Inferred>, String> {
        let x = input_type(inputs, 0)?;
        if x.dtype != DType::Bool {
            return Err(format!("Not needs BOOL, got {}", x.dtype));
        }
        Ok(vec![Inferred::new(ValueType { dtype: DType::Bool, shape: x.shape.clone() })])
    }

    fn eval(&self, _node: &Node, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, String> {
        let x = input(inputs, 0)?;
        let TensorData::Bool(v) = x.data() else { return Err(format!("Not needs BOOL, got {}", x.dtype())) };
        Ok(vec![tensor_bool(x.shape().to_vec(), v.iter().map(|b| !b).collect())?])
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::*;
    use crate::TensorData;

    #[test]
    fn not_negates_bools_only() -> Result<(), String> {
        let n = node("Not", 1, &[]);
        let out = eval(&n, &[&boolt(&[1, 3], &[true, false, true])])?;
        assert_eq!(out.shape(), &[1, 3]);
        assert_eq!(out.data(), &TensorData::Bool(vec![false, true, false]));
        assert!(eval(&n, &[&f32t(&[1], &[1.])]).is_err());
        Ok(())
    }
}
