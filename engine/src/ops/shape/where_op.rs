//! Where(cond, X, Y) with three-way broadcasting, any element type.

use crate::graph::{Dim, Node, ValueType};
use crate::ops::util::{broadcast_dims, broadcast_shapes, broadcast_strides, input, input_type};
use crate::ops::{InferInput, Inferred, OpDef};
use crate::{DType, Tensor, TensorData};

use super::{int_dims, is_int, strided_indices};

pub struct Where;

/// Flat indices into a tensor of `shape` broadcast to `out`.
pub(super) fn broadcast_index(shape: &[usize], out: &[usize]) -> Result<Vec<usize>, String> {
    let strides: Vec<i64> = broadcast_strides(shape, out).into_iter().map(|s| s as i64).collect();
    strided_indices(out, &strides, 0)
}

fn select<T: Clone>(c: &[bool], x: &[T], y: &[T], idx: &[[usize; 3]]) -> Vec<T> {
    idx.iter().map(|&[i, j, k]| if c[i] { x[j].clone() } else { y[k].clone() }).collect()
}

/// Elementwise select over 1-d shape values (a constant condition).
fn select_sym(c: &[bool], x: &[Dim], y: &[Dim]) -> Option<Vec<Dim>> {
    let n = c.len().max(x.len()).max(y.len());
    let fits = |len: usize| len == n || len == 1;
    if !(fits(c.len()) && fits(x.len()) && fits(y.len())) {
        return None;
    }
    let at = |len: usize, i: usize| if len == 1 { 0 } else { i };
    Some(
        (0..n).map(|i| if c[at(c.len(), i)] { x[at(x.len(), i)].clone() } else { y[at(y.len(), i)].clone() }).collect(),
    )
}

impl OpDef for Where {
    fn name(&self) -> &'static str {
        "Where"
    }

    fn infer(&self, _node: &Node, inputs: &[InferInput<'_>]) -> Result<Vec<Inferred>, String> {
        let c = input_type(inputs, 0)?;
        let (x, y) = (input_type(inputs, 1)?, input_type(inputs, 2)?);
        if c.dtype != DType::Bool {
            return Err(format!("condition must be BOOL, got {}", c.dtype));
        }
        if x.dtype != y.dtype {
            return Err(format!("X is {} but Y is {}", x.dtype, y.dtype));
        }
        let shape = match (&c.shape, &x.shape, &y.shape) {
            (Some(c), Some(x), Some(y)) => Some(broadcast_shapes(&broadcast_shapes(c, x)?, y)?),
            _ => None,
        };
        let mut sym = None;
        if let (true, Some(s), Some(cond)) = (is_int(x.dtype), &shape, inputs.first().and_then(|i| i.constant))
            && let (TensorData::Bool(cv), true) = (cond.data(), s.len() <= 1)
            && let (Some(xv), Some(yv)) = (int_dims(inputs.get(1)), int_dims(inputs.get(2)))
        {
            sym = select_sym(cv, &xv, &yv);
        }
        Ok(vec![Inferred { ty: ValueType { dtype: x.dtype, shape }, sym }])
    }

    fn eval(&self, _node: &Node, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, String> {
        let (c, x, y) = (input(inputs, 0)?, input(inputs, 1)?, input(inputs, 2)?);
        let TensorData::Bool(cv) = c.data() else {
            return Err(format!("condition must be BOOL, got {}", c.dtype()));
        };
        let out = broadcast_dims(&broadcast_dims(c.shape(), x.shape())?, y.shape())?;
        let (ic, ix, iy) =
            (broadcast_index(c.shape(), &out)?, broadcast_index(x.shape(), &out)?, broadcast_index(y.shape(), &out)?);
        let idx: Vec<[usize; 3]> = ic.into_iter().zip(ix).zip(iy).map(|((i, j), k)| [i, j, k]).collect();
        let data = match (x.data(), y.data()) {
            (TensorData::Bool(a), TensorData::Bool(b)) => TensorData::Bool(select(cv, a, b, &idx)),
            (TensorData::U8(a), TensorData::U8(b)) => TensorData::U8(select(cv, a, b, &idx)),
            (TensorData::I8(a), TensorData::I8(b)) => TensorData::I8(select(cv, a, b, &idx)),
            (TensorData::I16(a), TensorData::I16(b)) => TensorData::I16(select(cv, a, b, &idx)),
            (TensorData::I32(a), TensorData::I32(b)) => TensorData::I32(select(cv, a, b, &idx)),
            (TensorData::I64(a), TensorData::I64(b)) => TensorData::I64(select(cv, a, b, &idx)),
            (TensorData::F16(a), TensorData::F16(b)) => TensorData::F16(select(cv, a, b, &idx)),
            (TensorData::F32(a), TensorData::F32(b)) => TensorData::F32(select(cv, a, b, &idx)),
            (TensorData::F64(a), TensorData::F64(b)) => TensorData::F64(select(cv, a, b, &idx)),
            (TensorData::Bytes(a), TensorData::Bytes(b)) => TensorData::Bytes(select(cv, a, b, &idx)),
            (a, b) => return Err(format!("X is {} but Y is {}", a.dtype(), b.dtype())),
        };
        Ok(vec![Tensor::new(out, data).map_err(|e| e.to_string())?])
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::*;
    use crate::DType;
    use crate::ops::InferInput;
    use crate::ops::util::{f32s, i64s};

    #[test]
    fn where_broadcasts_all_three_inputs() -> Result<(), String> {
        let n = node("Where", 3, &[]);
        let c = boolt(&[2, 1], &[true, false]);
        let x = f32t(&[1, 3], &[1., 2., 3.]);
        let y = f32t(&[], &[-1.]);
        let out = eval(&n, &[&c, &x, &y])?;
        assert_eq!(out.shape(), &[2, 3]);
        assert_eq!(f32s(&out)?, &[1., 2., 3., -1., -1., -1.]);
        let out = eval(&n, &[&boolt(&[3], &[false, true, false]), &i64t(&[3], &[1, 2, 3]), &i64t(&[3], &[7, 8, 9])])?;
        assert_eq!(i64s(&out)?, &[7, 2, 9]);
        Ok(())
    }

    #[test]
    fn where_rejects_bad_inputs() {
        let n = node("Where", 3, &[]);
        let x = f32t(&[2], &[1., 2.]);
        assert!(eval(&n, &[&f32t(&[2], &[1., 0.]), &x, &x]).is_err());
        assert!(eval(&n, &[&boolt(&[2], &[true, false]), &x, &i64t(&[2], &[1, 2])]).is_err());
        assert!(eval(&n, &[&boolt(&[3], &[true; 3]), &x, &x]).is_err());
    }

    #[test]
    fn where_infers_shape_and_selects_sym() -> Result<(), String> {
        let n = node("Where", 3, &[]);
        let c = boolt(&[2], &[true, false]);
        let ct = vt(&c);
        let st = sym_ty(DType::I64, vec![f(2)]);
        let sv = [d("batch"), d("seq")];
        let s = InferInput { ty: Some(&st), constant: None, sym: Some(&sv) };
        let ones = i64t(&[2], &[1, 1]);
        let ot = vt(&ones);
        let out = infer(&n, &[konst(&c, &ct), konst(&ones, &ot), s])?;
        assert_eq!(out.ty, sym_ty(DType::I64, vec![f(2)]));
        assert_eq!(out.sym, Some(vec![f(1), d("seq")]));
        let mt = sym_ty(DType::Bool, vec![d("batch"), f(1), f(1), d("seq")]);
        let xt = sym_ty(DType::F32, vec![]);
        let out = infer(
            &n,
            &[
                InferInput { ty: Some(&mt), ..Default::default() },
                InferInput { ty: Some(&xt), ..Default::default() },
                InferInput { ty: Some(&xt), ..Default::default() },
            ],
        )?;
        assert_eq!(out.ty.shape, Some(vec![d("batch"), f(1), f(1), d("seq")]));
        Ok(())
    }
}
