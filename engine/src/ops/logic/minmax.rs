//! Variadic elementwise Max / Min with broadcasting (F32 and INT64).

use crate::graph::{Node, ValueType};
use crate::ops::util::{broadcast_shapes, for_each_broadcast, input_type, tensor_f32, tensor_i64};
use crate::ops::{InferInput, Inferred, OpDef};
use crate::{DType, Tensor, TensorData};

pub(super) struct MinMax {
    pub name: &'static str,
    pub pick_max: bool,
}

impl OpDef for MinMax {
    fn name(&self) -> &'static str {
        self.name
    }

    fn check(&self, node: &Node) -> Result<(), String> {
        if node.inputs.iter().flatten().next().is_none() { Err("needs at least one input".into()) } else { Ok(()) }
    }

    fn infer(&self, _node: &Node, inputs: &[InferInput<'_>]) -> Result<Vec<Inferred>, String> {
        let first = input_type(inputs, 0)?;
        if !matches!(first.dtype, DType::F32 | DType::I64 | DType::I32) {
            return Err(format!("{} of {} is not supported", self.name, first.dtype));
        }
        let mut shape = first.shape.clone();
        for i in 1..inputs.len() {
            let t = input_type(inputs, i)?;
            if t.dtype != first.dtype {
                return Err(format!("inputs are {} and {}", first.dtype, t.dtype));
            }
            shape = match (shape, &t.shape) {
                (Some(a), Some(b)) => Some(broadcast_shapes(&a, b)?),
                _ => None,
            };
        }
        Ok(vec![Inferred::new(ValueType { dtype: first.dtype, shape })])
    }

    fn eval(&self, _node: &Node, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, String> {
        let mut tensors = inputs.iter().flatten();
        let mut acc = (*tensors.next().ok_or("needs at least one input")?).clone();
        for t in tensors {
            acc = self.pair(&acc, t)?;
        }
        Ok(vec![acc])
    }
}

impl MinMax {
    fn pair(&self, a: &Tensor, b: &Tensor) -> Result<Tensor, String> {
        match (a.data(), b.data()) {
            (TensorData::F32(x), TensorData::F32(y)) => {
                let mut out = Vec::new();
                let shape = for_each_broadcast(a.shape(), b.shape(), |i, j| {
                    // NaN propagates, as ONNX Runtime does.
                    let (p, q) = (x[i], y[j]);
                    out.push(if p.is_nan() || q.is_nan() {
                        f32::NAN
                    } else if self.pick_max {
                        p.max(q)
                    } else {
                        p.min(q)
                    });
                })?;
                tensor_f32(shape, out)
            }
            (TensorData::I64(x), TensorData::I64(y)) => {
                let mut out = Vec::new();
                let shape = for_each_broadcast(a.shape(), b.shape(), |i, j| {
                    out.push(if self.pick_max { x[i].max(y[j]) } else { x[i].min(y[j]) });
                })?;
                tensor_i64(shape, out)
            }
            (TensorData::I32(x), TensorData::I32(y)) => {
                let mut out = Vec::new();
                let shape = for_each_broadcast(a.shape(), b.shape(), |i, j| {
                    out.push(if self.pick_max { x[i].max(y[j]) } else { x[i].min(y[j]) });
                })?;
                Tensor::new(shape, TensorData::I32(out)).map_err(|e| e.to_string())
            }
            _ => Err(format!("{} of {} and {} is not supported", self.name, a.dtype(), b.dtype())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::util::f32s;

    #[test]
    fn max_and_min_broadcast_over_many_inputs() -> Result<(), String> {
        let node = Node::new("n", "Max", vec![], vec![]);
        let a = tensor_f32(vec![2, 2], vec![1.0, -2.0, 3.0, -4.0])?;
        let b = tensor_f32(vec![2], vec![0.0, 0.0])?;
        let c = tensor_f32(vec![], vec![2.5])?;
        let max = MinMax { name: "Max", pick_max: true };
        let out = max.eval(&node, &[Some(&a), Some(&b), Some(&c)])?;
        assert_eq!(f32s(&out[0])?, &[2.5, 2.5, 3.0, 2.5]);
        let min = MinMax { name: "Min", pick_max: false };
        assert_eq!(f32s(&min.eval(&node, &[Some(&a), Some(&b)])?[0])?, &[0.0, -2.0, 0.0, -4.0]);
        let i = tensor_i64(vec![1], vec![3])?;
        assert!(max.eval(&node, &[Some(&a), Some(&i)]).is_err());
        Ok(())
    }
}
