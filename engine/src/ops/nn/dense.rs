//! kiln.Dense: Y = act(A·W + B + Z) with A [..., K], W [K, N], B [N] and Z
//! broadcastable to the output. The batch axes fold into GEMM rows and the
//! bias is preloaded so the GEMM accumulates onto it.

use super::activation::Activation;
use super::linalg::{MatMut, MatRef, gemm};
use crate::graph::{Dim, Node, ValueType};
use crate::ops::util::{binary_f32, broadcast_shapes, expect_f32, f32s, input, input_shape, input_type, tensor_f32};
use crate::ops::{InferInput, Inferred, OpDef};
use crate::{DType, Tensor};

/// Activations kiln.Dense accepts.
pub(crate) const DENSE_ACTIVATIONS: &[&str] = &["none", "relu", "gelu", "gelu_tanh", "tanh", "sigmoid", "clip"];

#[derive(Debug)]
pub(crate) struct Dense;

impl OpDef for Dense {
    fn name(&self) -> &'static str {
        "kiln.Dense"
    }

    fn check(&self, node: &Node) -> Result<(), String> {
        Activation::from_node(node, DENSE_ACTIVATIONS)?;
        if !(2..=4).contains(&node.inputs.len()) || node.outputs.len() != 1 {
            return Err("expects 2..=4 inputs and 1 output".into());
        }
        Ok(())
    }

    fn infer(&self, _node: &Node, inputs: &[InferInput<'_>]) -> Result<Vec<Inferred>, String> {
        expect_f32(input_type(inputs, 0)?)?;
        expect_f32(input_type(inputs, 1)?)?;
        let (Some(a), Some(w)) = (input_shape(inputs, 0), input_shape(inputs, 1)) else {
            return Ok(vec![Inferred::new(ValueType { dtype: DType::F32, shape: None })]);
        };
        let [k, n] = w.as_slice() else { return Err(format!("W must be 2-D, got rank {}", w.len())) };
        let Some(ka) = a.last() else { return Err("A must have rank >= 1".into()) };
        if let (Some(x), Some(y)) = (ka.as_fixed(), k.as_fixed())
            && x != y
        {
            return Err(format!("inner dimensions {x} and {y} differ"));
        }
        let mut out: Vec<Dim> = a[..a.len() - 1].to_vec();
        out.push(n.clone());
        if let Some(z) = input_shape(inputs, 3) {
            out = broadcast_shapes(&out, z)?;
        }
        Ok(vec![Inferred::new(ValueType::new(DType::F32, out))])
    }

    fn eval(&self, node: &Node, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, String> {
        let (a, w) = (input(inputs, 0)?, input(inputs, 1)?);
        let (&[k, n], Some(&ka)) = (w.shape(), a.shape().last()) else {
            return Err(format!("A must have rank >= 1 and W be 2-D, got {:?} and {:?}", a.shape(), w.shape()));
        };
        if k != ka {
            return Err(format!("A {:?} and W {:?}: inner dimensions differ", a.shape(), w.shape()));
        }
        let rows: usize = a.shape()[..a.shape().len() - 1].iter().product();
        let mut shape = a.shape()[..a.shape().len() - 1].to_vec();
        shape.push(n);
        let mut y = vec![0.0f32; rows * n];
        let mut beta = 0.0;
        if let Some(b) = inputs.get(2).copied().flatten() {
            let bs = f32s(b)?;
            if bs.len() != n {
                return Err(format!("bias {:?} should have {n} elements", b.shape()));
            }
            if n > 0 {
                for row in y.chunks_mut(n) {
                    row.copy_from_slice(bs);
                }
            }
            beta = 1.0;
        }
        gemm(
            1.0,
            MatRef::row_major(f32s(a)?, rows, k),
            MatRef::row_major(f32s(w)?, k, n),
            beta,
            MatMut::row_major(&mut y, rows, n),
        )?;
        let mut out = tensor_f32(shape, y)?;
        if let Some(z) = inputs.get(3).copied().flatten() {
            out = binary_f32(&out, z, |p, q| p + q)?;
        }
        let act = Activation::from_node(node, DENSE_ACTIVATIONS)?;
        if act == Activation::None {
            return Ok(vec![out]);
        }
        let shape = out.shape().to_vec();
        let mut data = match out.into_data() {
            crate::TensorData::F32(v) => v,
            other => return Err(format!("expected FP32, got {}", other.dtype())),
        };
        act.apply(&mut data);
        Ok(vec![tensor_f32(shape, data)?])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::Attr;
    use crate::ops::math::unary::gelu;
    use crate::ops::nn::linalg::tests::{Lcg, assert_close};

    #[test]
    fn dense_matches_matmul_bias_residual_activation() -> Result<(), String> {
        let mut r = Lcg(13);
        let (b, s, k, n) = (2, 3, 5, 4);
        let (a, w, bias, z) = (r.vec(b * s * k), r.vec(k * n), r.vec(n), r.vec(b * s * n));
        let node = Node::new("d", "kiln.Dense", (0..4).map(Some).collect(), vec![4])
            .with_attr("activation", Attr::String("gelu".into()));
        Dense.check(&node)?;
        let ins = [
            tensor_f32(vec![b, s, k], a.clone())?,
            tensor_f32(vec![k, n], w.clone())?,
            tensor_f32(vec![n], bias.clone())?,
            tensor_f32(vec![b, s, n], z.clone())?,
        ];
        let y = Dense.eval(&node, &ins.iter().map(Some).collect::<Vec<_>>())?;
        let mut want = Vec::new();
        for row in 0..b * s {
            for col in 0..n {
                let dot: f32 = (0..k).map(|p| a[row * k + p] * w[p * n + col]).sum();
                want.push(gelu(dot + bias[col] + z[row * n + col]));
            }
        }
        assert_eq!(y[0].shape(), &[b, s, n]);
        assert_close(f32s(&y[0])?, &want, 1e-5);
        // No bias, a broadcast residual [n], no activation; 1-D A.
        let plain = Node::new("d", "kiln.Dense", vec![Some(0), Some(1), None, Some(3)], vec![4]);
        let zr = tensor_f32(vec![n], bias.clone())?;
        let y = Dense.eval(&plain, &[Some(&tensor_f32(vec![k], a[..k].to_vec())?), Some(&ins[1]), None, Some(&zr)])?;
        assert_eq!(y[0].shape(), &[n]);
        let want: Vec<f32> = (0..n).map(|c| (0..k).map(|p| a[p] * w[p * n + c]).sum::<f32>() + bias[c]).collect();
        assert_close(f32s(&y[0])?, &want, 1e-5);
        assert!(Dense.eval(&plain, &[Some(&ins[1]), Some(&ins[1]), None, None]).is_err());
        Ok(())
    }

    #[test]
    fn infer_and_check() -> Result<(), String> {
        let node = Node::new("d", "kiln.Dense", vec![Some(0), Some(1)], vec![2]);
        let a = ValueType::new(DType::F32, vec![Dim::sym("batch"), Dim::sym("seq"), 384.into()]);
        let w = ValueType::new(DType::F32, vec![384.into(), 1536.into()]);
        let ins =
            [InferInput { ty: Some(&a), ..Default::default() }, InferInput { ty: Some(&w), ..Default::default() }];
        let out = Dense.infer(&node, &ins)?;
        assert_eq!(out[0].ty.shape, Some(vec![Dim::sym("batch"), Dim::sym("seq"), 1536.into()]));
        let bad = ValueType::new(DType::F32, vec![383.into(), 1536.into()]);
        let ins =
            [InferInput { ty: Some(&a), ..Default::default() }, InferInput { ty: Some(&bad), ..Default::default() }];
        assert!(Dense.infer(&node, &ins).is_err());
        assert!(Dense.check(&node.clone().with_attr("activation", Attr::String("silu".into()))).is_err());
        assert!(Dense.check(&node.with_attr("activation", Attr::String("gelu_tanh".into()))).is_ok());
        Ok(())
    }
}
