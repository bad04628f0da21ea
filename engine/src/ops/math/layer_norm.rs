//! LayerNormalization (ONNX 17): normalise over axes `axis..`, then scale and
//! shift. Only output Y is supported; the optional Mean and InvStdDev outputs
//! are training artefacts no exporter of inference graphs relies on.

use crate::Tensor;
use crate::graph::Node;
use crate::ops::util::{broadcast_dims, expect_f32, f32s, input, input_type, norm_axis, tensor_f32};
use crate::ops::{InferInput, Inferred, OpDef};

use super::binary::map2;
use super::checked_numel;

#[derive(Debug)]
pub(super) struct LayerNormalization;

/// `t` broadcast to exactly `target` (the normalised dims), row-major.
fn expand_to(t: &Tensor, target: &[usize], what: &str) -> Result<Vec<f32>, String> {
    let x = f32s(t)?;
    let n = checked_numel(target)?;
    // Equal up to size-1 axes: already in target's row-major order.
    if x.len() == n && t.shape().iter().filter(|&&d| d != 1).eq(target.iter().filter(|&&d| d != 1)) {
        return Ok(x.to_vec());
    }
    let out = broadcast_dims(t.shape(), target)?;
    if checked_numel(&out)? != n {
        return Err(format!("{what} of shape {:?} does not fit normalised shape {target:?}", t.shape()));
    }
    Ok(map2(x, t.shape(), &vec![0.0f32; n], target, |s, _| s)?.1)
}

impl OpDef for LayerNormalization {
    fn name(&self) -> &'static str {
        "LayerNormalization"
    }

    fn check(&self, node: &Node) -> Result<(), String> {
        if node.outputs.len() != 1 {
            return Err("only output Y is supported (not Mean / InvStdDev)".into());
        }
        if node.input(0).is_none() || node.input(1).is_none() || node.inputs.len() > 3 {
            return Err("LayerNormalization takes X, Scale and optional B".into());
        }
        node.attrs.int("axis", -1)?;
        node.attrs.float("epsilon", 1e-5)?;
        node.attrs.int("stash_type", 1).map(drop)
    }

    fn infer(&self, node: &Node, inputs: &[InferInput<'_>]) -> Result<Vec<Inferred>, String> {
        let t = input_type(inputs, 0)?;
        expect_f32(t)?;
        expect_f32(input_type(inputs, 1)?)?;
        if let Some(b) = inputs.get(2).and_then(|i| i.ty) {
            expect_f32(b)?;
        }
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
        let eps = f64::from(node.attrs.float("epsilon", 1e-5)?);
        let norm_dims = &shape[axis..];
        let n = checked_numel(norm_dims)?;
        let scale = expand_to(input(inputs, 1)?, norm_dims, "Scale")?;
        let bias = match inputs.get(2).copied().flatten() {
            Some(b) => expand_to(b, norm_dims, "B")?,
            None => vec![0.0; n],
        };
        let mut y = vec![0.0f32; x.len()];
        if n > 0 {
            for (row, out) in x.chunks_exact(n).zip(y.chunks_exact_mut(n)) {
                let mean = row.iter().map(|&v| f64::from(v)).sum::<f64>() / n as f64;
                let var = row.iter().map(|&v| (f64::from(v) - mean).powi(2)).sum::<f64>() / n as f64;
                let inv = (1.0 / (var + eps).sqrt()) as f32;
                let mean = mean as f32;
                for (((o, &v), &s), &b) in out.iter_mut().zip(row).zip(&scale).zip(&bias) {
                    *o = (v - mean) * inv * s + b;
                }
            }
        }
        Ok(vec![tensor_f32(shape.to_vec(), y)?])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DType;
    use crate::graph::{Attr, ValueType, fixed_shape};

    /// The ONNX formula, in f64.
    fn naive(x: &[f32], n: usize, scale: &[f32], bias: &[f32], eps: f64) -> Vec<f64> {
        x.chunks(n)
            .flat_map(|row| {
                let mean = row.iter().map(|&v| f64::from(v)).sum::<f64>() / n as f64;
                let var = row.iter().map(|&v| (f64::from(v) - mean).powi(2)).sum::<f64>() / n as f64;
                row.iter()
                    .enumerate()
                    .map(move |(i, &v)| {
                        (f64::from(v) - mean) / (var + eps).sqrt() * f64::from(scale[i]) + f64::from(bias[i])
                    })
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    fn ln(node: &Node, inputs: &[Option<&Tensor>]) -> Result<Vec<f32>, String> {
        Ok(f32s(&LayerNormalization.eval(node, inputs)?[0])?.to_vec())
    }

    #[test]
    fn matches_formula_on_last_axis_and_multiple_axes() -> Result<(), String> {
        let xs: Vec<f32> = (0..24).map(|i| (i as f32 * 0.7).cos() * 5.0 + 100.0).collect();
        let x = tensor_f32(vec![2, 3, 4], xs.clone())?;
        let scale = tensor_f32(vec![4], vec![1.0, 0.5, -2.0, 3.0])?;
        let bias = tensor_f32(vec![4], vec![0.1, 0.2, 0.3, 0.4])?;
        let node = Node::new("ln", "LayerNormalization", vec![Some(0), Some(1), Some(2)], vec![3]);
        let got = ln(&node, &[Some(&x), Some(&scale), Some(&bias)])?;
        let want = naive(&xs, 4, f32s(&scale)?, f32s(&bias)?, 1e-5);
        assert!(got.iter().zip(&want).all(|(a, b)| (f64::from(*a) - b).abs() < 1e-5), "{got:?} vs {want:?}");

        // axis=1 normalises over [3, 4]; scale given as [1, 4] broadcasts, no bias.
        let wide = tensor_f32(vec![1, 4], vec![2.0, 1.0, 1.0, 0.5])?;
        let node1 = Node::new("ln", "LayerNormalization", vec![Some(0), Some(1)], vec![2])
            .with_attr("axis", Attr::Int(1))
            .with_attr("epsilon", Attr::Float(1e-3));
        let got = ln(&node1, &[Some(&x), Some(&wide)])?;
        let s12: Vec<f32> = (0..12).map(|i| f32s(&wide).map(|w| w[i % 4]).unwrap_or(0.0)).collect();
        let want = naive(&xs, 12, &s12, &[0.0; 12], 1e-3);
        assert!(got.iter().zip(&want).all(|(a, b)| (f64::from(*a) - b).abs() < 1e-5), "{got:?} vs {want:?}");
        let bad_scale = tensor_f32(vec![3], vec![1.0; 3])?;
        assert!(LayerNormalization.eval(&node, &[Some(&x), Some(&bad_scale)]).is_err());
        Ok(())
    }

    #[test]
    fn rejects_extra_outputs_and_bad_axis() {
        let three = Node::new("ln", "LayerNormalization", vec![Some(0), Some(1)], vec![2, 3, 4]);
        assert!(LayerNormalization.check(&three).is_err());
        let one = Node::new("ln", "LayerNormalization", vec![Some(0), Some(1)], vec![2]);
        assert!(LayerNormalization.check(&one).is_ok());
        let ty = ValueType::new(DType::F32, fixed_shape(&[2, 4]));
        let far = one.clone().with_attr("axis", Attr::Int(2));
        let ins =
            [InferInput { ty: Some(&ty), ..Default::default() }, InferInput { ty: Some(&ty), ..Default::default() }];
        assert!(LayerNormalization.infer(&far, &ins).is_err());
        assert!(LayerNormalization.infer(&one, &ins).is_ok_and(|o| o[0].ty == ty));
    }
}
