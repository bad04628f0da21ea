//! Ordered comparisons (F32 or integer → Bool), boolean And/Or/Xor and IsNaN.

use crate::graph::{Node, ValueType};
use crate::ops::util::{broadcast_shapes, for_each_broadcast, input, input_type, tensor_bool};
use crate::ops::{InferInput, Inferred, OpDef, Registry};
use crate::{DType, Tensor, TensorData};

pub(super) fn register(r: &mut Registry) {
    r.add(Compare { name: "Greater", f: |o| o.is_gt() });
    r.add(Compare { name: "GreaterOrEqual", f: |o| o.is_ge() });
    r.add(Compare { name: "Less", f: |o| o.is_lt() });
    r.add(Compare { name: "LessOrEqual", f: |o| o.is_le() });
    r.add(Logic { name: "And", f: |a, b| a && b });
    r.add(Logic { name: "Or", f: |a, b| a || b });
    r.add(Logic { name: "Xor", f: |a, b| a != b });
    r.add(IsNan);
}

fn infer_binary_bool(inputs: &[InferInput<'_>]) -> Result<Vec<Inferred>, String> {
    let (a, b) = (input_type(inputs, 0)?, input_type(inputs, 1)?);
    let shape = match (&a.shape, &b.shape) {
        (Some(x), Some(y)) => Some(broadcast_shapes(x, y)?),
        _ => None,
    };
    Ok(vec![Inferred::new(ValueType { dtype: DType::Bool, shape })])
}

/// Both operands as f64 (exact for every i32 and for i64 ids and shapes below 2^53).
fn as_f64(t: &Tensor) -> Result<Vec<f64>, String> {
    Ok(match t.data() {
        TensorData::F32(v) => v.iter().map(|&x| f64::from(x)).collect(),
        TensorData::I64(v) => v.iter().map(|&x| x as f64).collect(),
        TensorData::I32(v) => v.iter().map(|&x| f64::from(x)).collect(),
        TensorData::U8(v) => v.iter().map(|&x| f64::from(x)).collect(),
        TensorData::I8(v) => v.iter().map(|&x| f64::from(x)).collect(),
        _ => return Err(format!("cannot compare {} tensors", t.dtype())),
    })
}

struct Compare {
    name: &'static str,
    f: fn(std::cmp::Ordering) -> bool,
}

impl OpDef for Compare {
    fn name(&self) -> &'static str {
        self.name
    }

    fn infer(&self, _node: &Node, inputs: &[InferInput<'_>]) -> Result<Vec<Inferred>, String> {
        infer_binary_bool(inputs)
    }

    fn eval(&self, _node: &Node, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, String> {
        let (a, b) = (input(inputs, 0)?, input(inputs, 1)?);
        if a.dtype() != b.dtype() {
            return Err(format!("operands are {} and {}", a.dtype(), b.dtype()));
        }
        let (x, y) = (as_f64(a)?, as_f64(b)?);
        let mut out = Vec::new();
        let shape = for_each_broadcast(a.shape(), b.shape(), |i, j| {
            // NaN compares false under every ordered comparison, as in ONNX.
            out.push(x[i].partial_cmp(&y[j]).is_some_and(self.f));
        })?;
        Ok(vec![tensor_bool(shape, out)?])
    }
}

struct Logic {
    name: &'static str,
    f: fn(bool, bool) -> bool,
}

impl OpDef for Logic {
    fn name(&self) -> &'static str {
        self.name
    }

    fn infer(&self, _node: &Node, inputs: &[InferInput<'_>]) -> Result<Vec<Inferred>, String> {
        infer_binary_bool(inputs)
    }

    fn eval(&self, _node: &Node, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, String> {
        let (a, b) = (input(inputs, 0)?, input(inputs, 1)?);
        let (TensorData::Bool(x), TensorData::Bool(y)) = (a.data(), b.data()) else {
            return Err(format!("{} needs BOOL operands, got {} and {}", self.name, a.dtype(), b.dtype()));
        };
        let mut out = Vec::new();
        let shape = for_each_broadcast(a.shape(), b.shape(), |i, j| out.push((self.f)(x[i], y[j])))?;
        Ok(vec![tensor_bool(shape, out)?])
    }
}

struct IsNan;

impl OpDef for IsNan {
    fn name(&self) -> &'static str {
        "IsNaN"
    }

    fn infer(&self, _node: &Node, inputs: &[InferInput<'_>]) -> Result<Vec<Inferred>, String> {
        let t = input_type(inputs, 0)?;
        Ok(vec![Inferred::new(ValueType { dtype: DType::Bool, shape: t.shape.clone() })])
    }

    fn eval(&self, _node: &Node, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, String> {
        let t = input(inputs, 0)?;
        let TensorData::F32(v) = t.data() else { return Err(format!("IsNaN needs a float input, got {}", t.dtype())) };
        Ok(vec![tensor_bool(t.shape().to_vec(), v.iter().map(|x| x.is_nan()).collect())?])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::util::{tensor_f32, tensor_i64};

    fn bools(t: &Tensor) -> Vec<bool> {
        match t.data() {
            TensorData::Bool(v) => v.clone(),
            _ => Vec::new(),
        }
    }

    #[test]
    fn comparisons_broadcast_and_treat_nan_as_unordered() -> Result<(), String> {
        let node = Node::new("n", "GreaterOrEqual", vec![], vec![]);
        let a = tensor_f32(vec![2, 2], vec![1.0, 2.0, f32::NAN, 4.0])?;
        let b = tensor_f32(vec![2], vec![2.0, 2.0])?;
        let ge = Compare { name: "GreaterOrEqual", f: |o| o.is_ge() };
        assert_eq!(bools(&ge.eval(&node, &[Some(&a), Some(&b)])?[0]), vec![false, true, false, true]);
        let lt = Compare { name: "Less", f: |o| o.is_lt() };
        let i = tensor_i64(vec![3], vec![-1, 5, 7])?;
        let j = tensor_i64(vec![], vec![5])?;
        assert_eq!(bools(&lt.eval(&node, &[Some(&i), Some(&j)])?[0]), vec![true, false, false]);
        assert!(lt.eval(&node, &[Some(&a), Some(&i)]).is_err());
        let nan = IsNan.eval(&node, &[Some(&a)])?;
        assert_eq!(bools(&nan[0]), vec![false, false, true, false]);
        Ok(())
    }

    #[test]
    fn logic_needs_bools() -> Result<(), String> {
        let node = Node::new("n", "And", vec![], vec![]);
        let a = tensor_bool(vec![2], vec![true, false])?;
        let b = tensor_bool(vec![2, 1], vec![true, false])?;
        let and = Logic { name: "And", f: |a, b| a && b };
        let out = and.eval(&node, &[Some(&a), Some(&b)])?;
        assert_eq!(out[0].shape(), &[2, 2]);
        assert_eq!(bools(&out[0]), vec![true, false, false, false]);
        let f = tensor_f32(vec![2], vec![1.0, 0.0])?;
        assert!(and.eval(&node, &[Some(&a), Some(&f)]).is_err());
        Ok(())
    }
}
