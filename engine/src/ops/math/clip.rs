//! Clip: bounds from optional scalar inputs (opset ≥ 11) or, in older models,
//! from `min`/`max` attributes.

use crate::graph::Node;
use crate::ops::util::{f32s, input, input_type, ints};
use crate::ops::{InferInput, Inferred, OpDef};
use crate::{DType, Tensor, TensorData};

#[derive(Debug)]
pub(super) struct Clip;

/// The bound in input `i`, else attribute `attr`, as one scalar.
fn bound_f32(node: &Node, inputs: &[Option<&Tensor>], i: usize, attr: &str, default: f32) -> Result<f32, String> {
    match inputs.get(i).copied().flatten() {
        Some(t) => match f32s(t)? {
            [v] => Ok(*v),
            _ => Err(format!("Clip bound {attr} must be a scalar, got shape {:?}", t.shape())),
        },
        None => node.attrs.float(attr, default),
    }
}

fn bound_int(inputs: &[Option<&Tensor>], i: usize, default: i64) -> Result<i64, String> {
    match inputs.get(i).copied().flatten() {
        Some(t) => match ints(t)?.as_slice() {
            [v] => Ok(*v),
            _ => Err(format!("Clip bound must be a scalar, got shape {:?}", t.shape())),
        },
        None => Ok(default),
    }
}

impl OpDef for Clip {
    fn name(&self) -> &'static str {
        "Clip"
    }

    fn check(&self, node: &Node) -> Result<(), String> {
        if node.input(0).is_none() || node.inputs.len() > 3 || node.outputs.len() != 1 {
            return Err("Clip takes an input, optional min and max, and has one output".into());
        }
        node.attrs.float("min", f32::NEG_INFINITY)?;
        node.attrs.float("max", f32::INFINITY)?;
        Ok(())
    }

    fn infer(&self, _node: &Node, inputs: &[InferInput<'_>]) -> Result<Vec<Inferred>, String> {
        let t = input_type(inputs, 0)?;
        if !matches!(t.dtype, DType::F32 | DType::I64 | DType::I32) {
            return Err(format!("Clip of {} is not supported", t.dtype));
        }
        for b in inputs.iter().skip(1).filter_map(|i| i.ty) {
            if b.dtype != t.dtype {
                return Err(format!("Clip bound is {}, input is {}", b.dtype, t.dtype));
            }
        }
        Ok(vec![Inferred::new(t.clone())])
    }

    fn eval(&self, node: &Node, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, String> {
        let t = input(inputs, 0)?;
        // max-then-min: when min > max every value becomes max, as ONNX specifies.
        let data = match t.data() {
            TensorData::F32(x) => {
                let lo = bound_f32(node, inputs, 1, "min", f32::NEG_INFINITY)?;
                let hi = bound_f32(node, inputs, 2, "max", f32::INFINITY)?;
                // Comparisons rather than max/min, so NaN passes through as in ONNX Runtime.
                let clip = |v: f32| {
                    if lo > hi {
                        hi
                    } else if v < lo {
                        lo
                    } else if v > hi {
                        hi
                    } else {
                        v
                    }
                };
                TensorData::F32(x.iter().map(|&v| clip(v)).collect())
            }
            TensorData::I64(x) => {
                let (lo, hi) = (bound_int(inputs, 1, i64::MIN)?, bound_int(inputs, 2, i64::MAX)?);
                TensorData::I64(x.iter().map(|&v| v.max(lo).min(hi)).collect())
            }
            TensorData::I32(x) => {
                let lo = i32::try_from(bound_int(inputs, 1, i64::from(i32::MIN))?).map_err(|e| e.to_string())?;
                let hi = i32::try_from(bound_int(inputs, 2, i64::from(i32::MAX))?).map_err(|e| e.to_string())?;
                TensorData::I32(x.iter().map(|&v| v.max(lo).min(hi)).collect())
            }
            _ => return Err(format!("Clip of {} is not supported", t.dtype())),
        };
        Ok(vec![Tensor::new(t.shape().to_vec(), data).map_err(|e| e.to_string())?])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::{Attr, ValueType, fixed_shape};
    use crate::ops::util::{i64s, tensor_f32, tensor_i64};

    fn clip(node: &Node, inputs: &[Option<&Tensor>]) -> Result<Tensor, String> {
        Clip.eval(node, inputs)?.pop().ok_or_else(|| "no output".to_string())
    }

    #[test]
    fn bounds_from_inputs_attributes_or_none() -> Result<(), String> {
        let x = tensor_f32(vec![5], vec![-10.0, -1.0, 0.5, 3.0, 10.0])?;
        let (lo, hi) = (tensor_f32(vec![], vec![0.0])?, tensor_f32(vec![], vec![6.0])?);
        let n = Node::new("c", "Clip", vec![Some(0), Some(1), Some(2)], vec![3]);
        assert_eq!(f32s(&clip(&n, &[Some(&x), Some(&lo), Some(&hi)])?)?, &[0.0, 0.0, 0.5, 3.0, 6.0]);
        // Only max given (min omitted).
        assert_eq!(f32s(&clip(&n, &[Some(&x), None, Some(&hi)])?)?, &[-10.0, -1.0, 0.5, 3.0, 6.0]);
        assert_eq!(f32s(&clip(&n, &[Some(&x)])?)?, f32s(&x)?);
        let attr_form = Node::new("c", "Clip", vec![Some(0)], vec![1])
            .with_attr("min", Attr::Float(-1.5))
            .with_attr("max", Attr::Float(2.0));
        assert_eq!(f32s(&clip(&attr_form, &[Some(&x)])?)?, &[-1.5, -1.0, 0.5, 2.0, 2.0]);
        // min > max: everything becomes max.
        assert_eq!(f32s(&clip(&n, &[Some(&x), Some(&hi), Some(&lo)])?)?, &[0.0; 5]);
        let vec_bound = tensor_f32(vec![2], vec![0.0, 1.0])?;
        assert!(clip(&n, &[Some(&x), Some(&vec_bound)]).is_err());
        let bad = Node::new("c", "Clip", vec![Some(0)], vec![1]).with_attr("min", Attr::String("x".into()));
        assert!(Clip.check(&bad).is_err());
        Ok(())
    }

    #[test]
    fn integer_clip_and_inference() -> Result<(), String> {
        let x = tensor_i64(vec![3], vec![-5, 2, 9])?;
        let lo = tensor_i64(vec![], vec![0])?;
        let n = Node::new("c", "Clip", vec![Some(0), Some(1)], vec![2]);
        assert_eq!(i64s(&clip(&n, &[Some(&x), Some(&lo)])?)?, &[0, 2, 9]);
        let t = ValueType::new(DType::F32, fixed_shape(&[2, 3]));
        let ti = ValueType::new(DType::I64, fixed_shape(&[]));
        let out = Clip.infer(&n, &[InferInput { ty: Some(&t), ..Default::default() }])?;
        assert_eq!(out[0].ty, t);
        let mixed =
            [InferInput { ty: Some(&t), ..Default::default() }, InferInput { ty: Some(&ti), ..Default::default() }];
        assert!(Clip.infer(&n, &mixed).is_err());
        Ok(())
    }
}
