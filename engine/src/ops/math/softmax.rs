//! Softmax along one axis (opset ≥ 13 semantics: default axis -1), with the
//! row maximum subtracted first so large logits do not overflow.

use crate::Tensor;
use crate::graph::Node;
use crate::ops::util::{expect_f32, f32s, input, input_type, norm_axis, tensor_f32};
use crate::ops::{InferInput, Inferred, OpDef};

#[derive(Debug)]
pub(super) struct Softmax;

impl OpDef for Softmax {
    fn name(&self) -> &'static str {
        "Softmax"
    }

    fn check(&self, node: &Node) -> Result<(), String> {
        if node.inputs.len() != 1 || node.input(0).is_none() || node.outputs.len() != 1 {
            return Err("Softmax takes one input and has one output".into());
        }
        node.attrs.int("axis", -1).map(drop)
    }

    fn infer(&self, node: &Node, inputs: &[InferInput<'_>]) -> Result<Vec<Inferred>, String> {
        let t = input_type(inputs, 0)?;
        expect_f32(t)?;
        if let Some(rank) = t.rank() {
            norm_axis(node.attrs.int("axis", -1)?, rank)?;
        }
        Ok(vec![Inferred::new(t.clone())])
    }

    fn eval(&self, node: &Node, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, String> {
        let t = input(inputs, 0)?;
        let x = f32s(t)?;
        let shape = t.shape();
        let axis = norm_axis(node.attrs.int("axis", -1)?, shape.len())?;
        let n = shape[axis];
        let inner: usize = shape[axis + 1..].iter().product();
        let mut y = x.to_vec();
        if n == 0 || y.is_empty() {
            return Ok(vec![tensor_f32(shape.to_vec(), y)?]);
        }
        if inner == 1 {
            y.chunks_exact_mut(n).for_each(softmax_row);
        } else {
            // Strided axis: gather each column, normalise it, scatter it back.
            let mut col = vec![0.0f32; n];
            for block in y.chunks_exact_mut(n * inner) {
                for j in 0..inner {
                    for (k, c) in col.iter_mut().enumerate() {
                        *c = block[k * inner + j];
                    }
                    softmax_row(&mut col);
                    for (k, c) in col.iter().enumerate() {
                        block[k * inner + j] = *c;
                    }
                }
            }
        }
        Ok(vec![tensor_f32(shape.to_vec(), y)?])
    }
}

/// In-place stable softmax of one row.
pub(crate) fn softmax_row(row: &mut [f32]) {
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let mut sum = 0.0f32;
    for v in row.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    let inv = 1.0 / sum;
    for v in row.iter_mut() {
        *v *= inv;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DType;
    use crate::graph::{Attr, ValueType, fixed_shape};

    fn naive(v: &[f64]) -> Vec<f64> {
        let e: Vec<f64> = v.iter().map(|x| x.exp()).collect();
        let s: f64 = e.iter().sum();
        e.iter().map(|x| x / s).collect()
    }

    fn softmax(axis: i64, t: &Tensor) -> Result<Vec<f32>, String> {
        let n = Node::new("s", "Softmax", vec![Some(0)], vec![1]).with_attr("axis", Attr::Int(axis));
        let out = Softmax.eval(&n, &[Some(t)])?;
        Ok(f32s(&out[0])?.to_vec())
    }

    #[test]
    fn last_axis_matches_formula_and_is_stable() -> Result<(), String> {
        let t = tensor_f32(vec![2, 3], vec![1.0, 2.0, 3.0, -1.0, 0.0, 0.5])?;
        let y = softmax(-1, &t)?;
        let want: Vec<f64> = naive(&[1.0, 2.0, 3.0]).into_iter().chain(naive(&[-1.0, 0.0, 0.5])).collect();
        for (a, b) in y.iter().zip(&want) {
            assert!((f64::from(*a) - b).abs() < 1e-7);
        }
        // exp(1000) overflows f32; shifting by the max keeps it exact.
        let big = tensor_f32(vec![3], vec![1000.0, 1001.0, 1002.0])?;
        let y = softmax(-1, &big)?;
        for (a, b) in y.iter().zip(naive(&[0.0, 1.0, 2.0])) {
            assert!(a.is_finite() && (f64::from(*a) - b).abs() < 1e-7, "{y:?}");
        }
        let masked = tensor_f32(vec![3], vec![0.0, -1e30, f32::MIN])?;
        assert_eq!(softmax(0, &masked)?, vec![1.0, 0.0, 0.0]);
        Ok(())
    }

    #[test]
    fn inner_axis_normalises_columns() -> Result<(), String> {
        let data: Vec<f32> = (0..24).map(|i| (i as f32 * 0.37).sin() * 3.0).collect();
        let t = tensor_f32(vec![2, 3, 4], data.clone())?;
        let y = softmax(1, &t)?;
        for b in 0..2 {
            for j in 0..4 {
                let col: Vec<f64> = (0..3).map(|k| f64::from(data[b * 12 + k * 4 + j])).collect();
                for (k, want) in naive(&col).into_iter().enumerate() {
                    assert!((f64::from(y[b * 12 + k * 4 + j]) - want).abs() < 1e-6);
                }
            }
        }
        assert!(softmax(3, &t).is_err());
        let n = Node::new("s", "Softmax", vec![Some(0)], vec![1]).with_attr("axis", Attr::Int(-4));
        let ty = ValueType::new(DType::F32, fixed_shape(&[2, 3, 4]));
        assert!(Softmax.infer(&n, &[InferInput { ty: Some(&ty), ..Default::default() }]).is_err());
        Ok(())
    }
}
