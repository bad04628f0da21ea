//! Equal with broadcasting: FP32, INT64, INT32 or BOOL inputs, BOOL output.

use crate::graph::{Node, ValueType};
use crate::ops::util::{broadcast_shapes, for_each_broadcast, input, input_type, tensor_bool};
use crate::ops::{InferInput, Inferred, OpDef};
use crate::{DType, Tensor, TensorData};

pub struct Equal;

fn compare<T: PartialEq>(a: &Tensor, x: &[T], b: &Tensor, y: &[T]) -> Result<Tensor, String> {
    let mut out = Vec::new();
    let shape = for_each_broadcast(a.shape(), b.shape(), |i, j| out.push(x[i] == y[j]))?;
    tensor_bool(shape, out)
}

impl OpDef for Equal {
    fn name(&self) -> &'static str {
        "Equal"
    }

    fn infer(&self, _node: &Node, inputs: &[InferInput<'_>]) -> Result<Vec<Inferred>, String> {
        let (a, b) = (input_type(inputs, 0)?, input_type(inputs, 1)?);
        if a.dtype != b.dtype {
            return Err(format!("cannot compare {} with {}", a.dtype, b.dtype));
        }
        if !matches!(a.dtype, DType::F32 | DType::I64 | DType::I32 | DType::Bool) {
            return Err(format!("Equal on {} is not supported", a.dtype));
        }
        let shape = match (&a.shape, &b.shape) {
            (Some(x), Some(y)) => Some(broadcast_shapes(x, y)?),
            _ => None,
        };
        Ok(vec![Inferred::new(ValueType { dtype: DType::Bool, shape })])
    }

    fn eval(&self, _node: &Node, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, String> {
        let (a, b) = (input(inputs, 0)?, input(inputs, 1)?);
        let out = match (a.data(), b.data()) {
            (TensorData::F32(x), TensorData::F32(y)) => compare(a, x, b, y)?,
            (TensorData::I64(x), TensorData::I64(y)) => compare(a, x, b, y)?,
            (TensorData::I32(x), TensorData::I32(y)) => compare(a, x, b, y)?,
            (TensorData::Bool(x), TensorData::Bool(y)) => compare(a, x, b, y)?,
            _ => return Err(format!("cannot compare {} with {}", a.dtype(), b.dtype())),
        };
        Ok(vec![out])
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::*;
    use crate::DType;
    use crate::TensorData;
    use crate::ops::InferInput;

    #[test]
    fn equal_broadcasts_over_dtypes() -> Result<(), String> {
        let n = node("Equal", 2, &[]);
        let out = eval(&n, &[&i64t(&[2, 2], &[1, -1, -1, 4]), &i64t(&[], &[-1])])?;
        assert_eq!(out.data(), &TensorData::Bool(vec![false, true, true, false]));
        let out = eval(&n, &[&f32t(&[2, 1], &[1., 2.]), &f32t(&[2], &[2., 1.])])?;
        assert_eq!(out.shape(), &[2, 2]);
        assert_eq!(out.data(), &TensorData::Bool(vec![false, true, true, false]));
        let out = eval(&n, &[&boolt(&[2], &[true, false]), &boolt(&[1], &[false])])?;
        assert_eq!(out.data(), &TensorData::Bool(vec![false, true]));
        Ok(())
    }

    #[test]
    fn equal_rejects_mixed_or_mismatched_inputs() -> Result<(), String> {
        let n = node("Equal", 2, &[]);
        assert!(eval(&n, &[&i64t(&[1], &[1]), &f32t(&[1], &[1.])]).is_err());
        assert!(eval(&n, &[&i64t(&[2], &[1, 2]), &i64t(&[3], &[1, 2, 3])]).is_err());
        let at = sym_ty(DType::I64, vec![d("batch"), f(1)]);
        let bt = sym_ty(DType::I64, vec![f(5)]);
        let a = InferInput { ty: Some(&at), ..Default::default() };
        let b = InferInput { ty: Some(&bt), ..Default::default() };
        assert_eq!(infer(&n, &[a, b])?.ty, sym_ty(DType::Bool, vec![d("batch"), f(5)]));
        let ft = sym_ty(DType::F32, vec![f(5)]);
        assert!(infer(&n, &[a, InferInput { ty: Some(&ft), ..Default::default() }]).is_err());
        Ok(())
    }
}
