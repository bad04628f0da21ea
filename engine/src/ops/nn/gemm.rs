//! Gemm: Y = α·A'·B' + β·C with optional transposes and C broadcast to [M, N].
//! The transposes are strided views; the GEMM accumulates onto C.

use super::linalg::{MatMut, MatRef, gemm};
use crate::graph::{Node, ValueType};
use crate::ops::util::{broadcast_strides, expect_f32, f32s, input, input_shape, input_type, tensor_f32};
use crate::ops::{InferInput, Inferred, OpDef};
use crate::{DType, Tensor};

#[derive(Debug)]
pub(crate) struct Gemm;

fn flag(node: &Node, name: &str) -> Result<bool, String> {
    match node.attrs.int(name, 0)? {
        0 => Ok(false),
        1 => Ok(true),
        v => Err(format!("{name} {v} must be 0 or 1")),
    }
}

impl OpDef for Gemm {
    fn name(&self) -> &'static str {
        "Gemm"
    }

    fn check(&self, node: &Node) -> Result<(), String> {
        flag(node, "transA")?;
        flag(node, "transB")?;
        node.attrs.float("alpha", 1.0)?;
        node.attrs.float("beta", 1.0)?;
        if !(2..=3).contains(&node.inputs.len()) || node.outputs.len() != 1 {
            return Err("expects 2 or 3 inputs and 1 output".into());
        }
        Ok(())
    }

    fn infer(&self, node: &Node, inputs: &[InferInput<'_>]) -> Result<Vec<Inferred>, String> {
        expect_f32(input_type(inputs, 0)?)?;
        expect_f32(input_type(inputs, 1)?)?;
        let (Some(a), Some(b)) = (input_shape(inputs, 0), input_shape(inputs, 1)) else {
            return Ok(vec![Inferred::new(ValueType { dtype: DType::F32, shape: None })]);
        };
        if a.len() != 2 || b.len() != 2 {
            return Err(format!("A and B must be 2-D, got ranks {} and {}", a.len(), b.len()));
        }
        let (ta, tb) = (flag(node, "transA")?, flag(node, "transB")?);
        let (m, ka) = if ta { (&a[1], &a[0]) } else { (&a[0], &a[1]) };
        let (kb, n) = if tb { (&b[1], &b[0]) } else { (&b[0], &b[1]) };
        if let (Some(x), Some(y)) = (ka.as_fixed(), kb.as_fixed())
            && x != y
        {
            return Err(format!("inner dimensions {x} and {y} differ"));
        }
        Ok(vec![Inferred::new(ValueType::new(DType::F32, vec![m.clone(), n.clone()]))])
    }

    fn eval(&self, node: &Node, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, String> {
        let (a, b) = (input(inputs, 0)?, input(inputs, 1)?);
        let (&[ar, ac], &[br, bc]) = (a.shape(), b.shape()) else {
            return Err(format!("A and B must be 2-D, got {:?} and {:?}", a.shape(), b.shape()));
        };
        let (ta, tb) = (flag(node, "transA")?, flag(node, "transB")?);
        let alpha = node.attrs.float("alpha", 1.0)?;
        let mut am = MatRef::row_major(f32s(a)?, ar, ac);
        let mut bm = MatRef::row_major(f32s(b)?, br, bc);
        if ta {
            am = am.t();
        }
        if tb {
            bm = bm.t();
        }
        let (m, n) = (am.rows, bm.cols);
        let mut y = vec![0.0f32; m * n];
        let mut beta = 0.0;
        if let Some(c) = inputs.get(2).copied().flatten() {
            fill_broadcast(&mut y, f32s(c)?, c.shape(), m, n)?;
            beta = node.attrs.float("beta", 1.0)?;
        }
        gemm(alpha, am, bm, beta, MatMut::row_major(&mut y, m, n))?;
        Ok(vec![tensor_f32(vec![m, n], y)?])
    }
}

/// Writes `c` (unidirectionally broadcastable to [m, n]) into `y`.
fn fill_broadcast(y: &mut [f32], c: &[f32], shape: &[usize], m: usize, n: usize) -> Result<(), String> {
    let out = [m, n];
    let fits = shape.len() <= 2 && shape.iter().rev().zip(out.iter().rev()).all(|(&s, &o)| s == o || s == 1);
    if !fits {
        return Err(format!("C {shape:?} does not broadcast to [{m}, {n}]"));
    }
    let st = broadcast_strides(shape, &out);
    for i in 0..m {
        for j in 0..n {
            y[i * n + j] = c[i * st[0] + j * st[1]];
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::{Attr, Dim};
    use crate::ops::nn::linalg::tests::{Lcg, assert_close};

    #[test]
    fn matches_naive_for_every_transpose_and_bias_shape() -> Result<(), String> {
        let mut r = Lcg(9);
        let (m, k, n) = (3, 4, 5);
        for (ta, tb) in [(0, 0), (1, 0), (0, 1), (1, 1)] {
            for cshape in [vec![], vec![n], vec![1, n], vec![m, 1], vec![m, n]] {
                let a = r.vec(m * k);
                let b = r.vec(k * n);
                let c = r.vec(cshape.iter().product());
                let node = Node::new("g", "Gemm", vec![Some(0), Some(1), Some(2)], vec![3])
                    .with_attr("transA", Attr::Int(ta))
                    .with_attr("transB", Attr::Int(tb))
                    .with_attr("alpha", Attr::Float(0.5))
                    .with_attr("beta", Attr::Float(2.0));
                let at = tensor_f32(if ta == 1 { vec![k, m] } else { vec![m, k] }, a.clone())?;
                let bt = tensor_f32(if tb == 1 { vec![n, k] } else { vec![k, n] }, b.clone())?;
                let ct = tensor_f32(cshape.clone(), c.clone())?;
                Gemm.check(&node)?;
                let y = Gemm.eval(&node, &[Some(&at), Some(&bt), Some(&ct)])?;
                let mut want = vec![0.0; m * n];
                for i in 0..m {
                    for j in 0..n {
                        let mut s = 0.0;
                        for p in 0..k {
                            let av = if ta == 1 { a[p * m + i] } else { a[i * k + p] };
                            let bv = if tb == 1 { b[j * k + p] } else { b[p * n + j] };
                            s += av * bv;
                        }
                        let cv = match cshape.as_slice() {
                            [] => c[0],
                            [_] | [1, _] => c[j],
                            [_, 1] => c[i],
                            _ => c[i * n + j],
                        };
                        want[i * n + j] = 0.5 * s + 2.0 * cv;
                    }
                }
                assert_eq!(y[0].shape(), &[m, n]);
                assert_close(f32s(&y[0])?, &want, 1e-5);
            }
        }
        let a = tensor_f32(vec![2, 3], r.vec(6))?;
        let node = Node::new("g", "Gemm", vec![Some(0), Some(1)], vec![2]);
        let y = Gemm.eval(&node, &[Some(&a), Some(&tensor_f32(vec![3, 2], r.vec(6))?)])?;
        assert_eq!(y[0].shape(), &[2, 2]);
        assert!(Gemm.eval(&node, &[Some(&a), Some(&a)]).is_err());
        let bad_c = tensor_f32(vec![3], r.vec(3))?;
        assert!(Gemm.eval(&node, &[Some(&a), Some(&tensor_f32(vec![3, 2], r.vec(6))?), Some(&bad_c)]).is_err());
        Ok(())
    }

    #[test]
    fn infer_and_check() -> Result<(), String> {
        let node = Node::new("g", "Gemm", vec![Some(0), Some(1)], vec![2]).with_attr("transB", Attr::Int(1));
        let a = ValueType::new(DType::F32, vec![Dim::sym("batch"), 2048.into()]);
        let b = ValueType::new(DType::F32, vec![1000.into(), 2048.into()]);
        let ins =
            [InferInput { ty: Some(&a), ..Default::default() }, InferInput { ty: Some(&b), ..Default::default() }];
        assert_eq!(Gemm.infer(&node, &ins)?[0].ty.shape, Some(vec![Dim::sym("batch"), 1000.into()]));
        let plain = Node::new("g", "Gemm", vec![Some(0), Some(1)], vec![2]);
        assert!(Gemm.infer(&plain, &ins).is_err());
        assert!(Gemm.check(&node.clone().with_attr("transA", Attr::Int(2))).is_err());
        assert!(Gemm.check(&node).is_ok());
        Ok(())
    }
}
