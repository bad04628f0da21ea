//! BatchNormalization in inference mode: Y = (X − mean)/√(var + ε)·scale + B
//! per channel (axis 1). Training mode and the running-statistics outputs are
//! rejected at import.

use rayon::prelude::*;

use crate::Tensor;
use crate::graph::{Node, ValueType};
use crate::ops::util::{expect_f32, f32s, input, input_type, tensor_f32};
use crate::ops::{InferInput, Inferred, OpDef};

#[derive(Debug)]
pub(crate) struct BatchNorm;

impl OpDef for BatchNorm {
    fn name(&self) -> &'static str {
        "BatchNormalization"
    }

    fn check(&self, node: &Node) -> Result<(), String> {
        if node.attrs.int("training_mode", 0)? != 0 {
            return Err("training_mode=1 is not supported (inference only)".into());
        }
        node.attrs.float("epsilon", 1e-5)?;
        if node.outputs.len() != 1 {
            return Err("only output Y is supported (running mean/var outputs are training-only)".into());
        }
        if node.inputs.len() != 5 || node.inputs.iter().any(Option::is_none) {
            return Err("expects 5 inputs (X, scale, B, mean, var)".into());
        }
        Ok(())
    }

    fn infer(&self, _node: &Node, inputs: &[InferInput<'_>]) -> Result<Vec<Inferred>, String> {
        let x = input_type(inputs, 0)?;
        expect_f32(x)?;
        if x.rank().is_some_and(|r| r < 2) {
            return Err("input must have rank >= 2 ([N, C, ...])".into());
        }
        Ok(vec![Inferred::new(ValueType { dtype: x.dtype, shape: x.shape.clone() })])
    }

    fn eval(&self, node: &Node, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, String> {
        let x = input(inputs, 0)?;
        let eps = node.attrs.float("epsilon", 1e-5)?;
        let shape = x.shape();
        if shape.len() < 2 {
            return Err(format!("input must have rank >= 2, got {shape:?}"));
        }
        let c = shape[1];
        let params: Vec<&[f32]> = (1..5).map(|i| input(inputs, i).and_then(f32s)).collect::<Result<_, _>>()?;
        if params.iter().any(|p| p.len() != c) {
            return Err(format!("scale, B, mean and var must each have {c} elements"));
        }
        let (scale, bias, mean, var) = (params[0], params[1], params[2], params[3]);
        // Per channel y = x·a + b with a = scale/√(var+ε), b = B − mean·a.
        let a: Vec<f32> = (0..c).map(|i| scale[i] / (var[i] + eps).sqrt()).collect();
        let b: Vec<f32> = (0..c).map(|i| bias[i] - mean[i] * a[i]).collect();
        let inner: usize = shape[2..].iter().product();
        let mut y = f32s(x)?.to_vec();
        if inner > 0 {
            y.par_chunks_mut(inner).enumerate().for_each(|(i, plane)| {
                let (ai, bi) = (a[i % c], b[i % c]);
                let mut j = 0;
                while j < plane.len() {
                    plane[j] = plane[j] * ai + bi;
                    j += 1;
                }
            });
        }
        Ok(vec![tensor_f32(shape.to_vec(), y)?])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::Attr;
    use crate::ops::nn::linalg::tests::{Lcg, assert_close};

    #[test]
    fn matches_formula_per_channel() -> Result<(), String> {
        let mut r = Lcg(5);
        let (n, c, hw) = (2, 3, 4);
        let x = r.vec(n * c * hw);
        let scale = r.vec(c);
        let bias = r.vec(c);
        let mean = r.vec(c);
        let var: Vec<f32> = r.vec(c).iter().map(|v| v.abs() + 0.1).collect();
        let node = Node::new("bn", "BatchNormalization", (0..5).map(Some).collect(), vec![5])
            .with_attr("epsilon", Attr::Float(1e-3));
        let ts = [
            tensor_f32(vec![n, c, 2, 2], x.clone())?,
            tensor_f32(vec![c], scale.clone())?,
            tensor_f32(vec![c], bias.clone())?,
            tensor_f32(vec![c], mean.clone())?,
            tensor_f32(vec![c], var.clone())?,
        ];
        let refs: Vec<Option<&Tensor>> = ts.iter().map(Some).collect();
        BatchNorm.check(&node)?;
        let y = BatchNorm.eval(&node, &refs)?;
        let want: Vec<f32> = x
            .iter()
            .enumerate()
            .map(|(i, &v)| {
                let ch = (i / hw) % c;
                (v - mean[ch]) / (var[ch] + 1e-3).sqrt() * scale[ch] + bias[ch]
            })
            .collect();
        assert_eq!(y[0].shape(), &[n, c, 2, 2]);
        assert_close(f32s(&y[0])?, &want, 1e-5);
        // Rank 2 ([N, C], after a Gemm) works too.
        let ts2 = [tensor_f32(vec![2, c], r.vec(2 * c))?];
        let refs2: Vec<Option<&Tensor>> = std::iter::once(Some(&ts2[0])).chain(refs[1..].iter().copied()).collect();
        assert_eq!(BatchNorm.eval(&node, &refs2)?[0].shape(), &[2, c]);
        let short = tensor_f32(vec![2], vec![1.0, 2.0])?;
        let bad: Vec<Option<&Tensor>> = vec![refs[0], Some(&short), refs[2], refs[3], refs[4]];
        assert!(BatchNorm.eval(&node, &bad).is_err());
        Ok(())
    }

    #[test]
    fn check_rejects_training_mode_and_extra_outputs() {
        let node = Node::new("bn", "BatchNormalization", (0..5).map(Some).collect(), vec![5]);
        assert!(BatchNorm.check(&node).is_ok());
        assert!(BatchNorm.check(&node.clone().with_attr("training_mode", Attr::Int(1))).is_err());
        let mut extra = node.clone();
        extra.outputs = vec![5, 6, 7];
        assert!(BatchNorm.check(&extra).is_err());
        let mut missing = node;
        missing.inputs.pop();
        assert!(BatchNorm.check(&missing).is_err());
    }
}
