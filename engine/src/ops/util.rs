//! Helpers shared by op modules: input access, typed views, axes and
//! broadcasting (symbolic for inference, concrete for evaluation).

use crate::graph::{Dim, Shape, ValueType};
use crate::{DType, Tensor, TensorData};

use super::InferInput;

/// The i-th evaluated input, or an error naming it.
pub fn input<'a>(inputs: &[Option<&'a Tensor>], i: usize) -> Result<&'a Tensor, String> {
    inputs.get(i).copied().flatten().ok_or_else(|| format!("input {i} is missing"))
}

/// The i-th input's type, or an error naming it.
pub fn input_type<'a>(inputs: &[InferInput<'a>], i: usize) -> Result<&'a ValueType, String> {
    inputs.get(i).and_then(|x| x.ty).ok_or_else(|| format!("input {i} has no known type"))
}

/// The i-th input's shape when known.
pub fn input_shape<'a>(inputs: &[InferInput<'a>], i: usize) -> Option<&'a Shape> {
    inputs.get(i).and_then(|x| x.ty).and_then(|t| t.shape.as_ref())
}

pub fn f32s(t: &Tensor) -> Result<&[f32], String> {
    match t.data() {
        TensorData::F32(v) => Ok(v),
        _ => Err(format!("expected FP32, got {}", t.dtype())),
    }
}

pub fn i64s(t: &Tensor) -> Result<&[i64], String> {
    match t.data() {
        TensorData::I64(v) => Ok(v),
        _ => Err(format!("expected INT64, got {}", t.dtype())),
    }
}

/// Integer contents of an INT64 or INT32 tensor (shapes, axes, indices).
pub fn ints(t: &Tensor) -> Result<Vec<i64>, String> {
    match t.data() {
        TensorData::I64(v) => Ok(v.clone()),
        TensorData::I32(v) => Ok(v.iter().map(|&x| i64::from(x)).collect()),
        _ => Err(format!("expected an integer tensor, got {}", t.dtype())),
    }
}

pub fn tensor_f32(shape: Vec<usize>, data: Vec<f32>) -> Result<Tensor, String> {
    Tensor::new(shape, TensorData::F32(data)).map_err(|e| e.to_string())
}

pub fn tensor_i64(shape: Vec<usize>, data: Vec<i64>) -> Result<Tensor, String> {
    Tensor::new(shape, TensorData::I64(data)).map_err(|e| e.to_string())
}

pub fn tensor_bool(shape: Vec<usize>, data: Vec<bool>) -> Result<Tensor, String> {
    Tensor::new(shape, TensorData::Bool(data)).map_err(|e| e.to_string())
}

/// `axis` in `-rank..rank` → `0..rank`.
pub fn norm_axis(axis: i64, rank: usize) -> Result<usize, String> {
    let r = rank as i64;
    let a = if axis < 0 { axis + r } else { axis };
    if (0..r).contains(&a) { Ok(a as usize) } else { Err(format!("axis {axis} out of range for rank {rank}")) }
}

/// Multidirectional (numpy) broadcasting of symbolic shapes. Two different
/// symbols broadcast to the one that is not known to be 1; when neither is
/// known the left one wins (a graph that relies on anything else is invalid).
pub fn broadcast_shapes(a: &[Dim], b: &[Dim]) -> Result<Shape, String> {
    let rank = a.len().max(b.len());
    let one = Dim::fixed(1);
    let mut out = Vec::with_capacity(rank);
    for i in 0..rank {
        let da = if i + a.len() >= rank { &a[i + a.len() - rank] } else { &one };
        let db = if i + b.len() >= rank { &b[i + b.len() - rank] } else { &one };
        let d = if da == db || *db == one {
            da.clone()
        } else if *da == one {
            db.clone()
        } else if da.is_fixed() && db.is_fixed() {
            return Err(format!("shapes {a:?} and {b:?} do not broadcast"));
        } else if da.is_fixed() {
            da.clone()
        } else {
            db.clone()
        };
        out.push(d);
    }
    Ok(out)
}

/// Concrete multidirectional broadcasting.
pub fn broadcast_dims(a: &[usize], b: &[usize]) -> Result<Vec<usize>, String> {
    let rank = a.len().max(b.len());
    let mut out = Vec::with_capacity(rank);
    for i in 0..rank {
        let da = if i + a.len() >= rank { a[i + a.len() - rank] } else { 1 };
        let db = if i + b.len() >= rank { b[i + b.len() - rank] } else { 1 };
        out.push(match (da, db) {
            _ if da == db => da,
            (1, d) | (d, 1) => d,
            _ => return Err(format!("shapes {a:?} and {b:?} do not broadcast")),
        });
    }
    Ok(out)
}

/// Row-major strides of `shape` aligned to `out` (rank ≥ shape's), 0 where broadcast.
pub fn broadcast_strides(shape: &[usize], out: &[usize]) -> Vec<usize> {
    let mut strides = vec![0; out.len()];
    let offset = out.len() - shape.len();
    let mut s = 1;
    for i in (0..shape.len()).rev() {
        if shape[i] != 1 {
            strides[i + offset] = s;
        }
        s *= shape[i];
    }
    strides
}

/// For every output position of a broadcast, the flat indices into `a` and `b`.
/// Visits in row-major output order.
pub fn for_each_broadcast(a: &[usize], b: &[usize], mut f: impl FnMut(usize, usize)) -> Result<Vec<usize>, String> {
    let out = broadcast_dims(a, b)?;
    let n: usize = out.iter().product();
    let sa = broadcast_strides(a, &out);
    let sb = broadcast_strides(b, &out);
    let mut idx = vec![0usize; out.len()];
    let (mut ia, mut ib) = (0usize, 0usize);
    for _ in 0..n {
        f(ia, ib);
        for d in (0..out.len()).rev() {
            idx[d] += 1;
            ia += sa[d];
            ib += sb[d];
            if idx[d] < out[d] {
                break;
            }
            ia -= sa[d] * out[d];
            ib -= sb[d] * out[d];
            idx[d] = 0;
        }
    }
    Ok(out)
}

/// Elementwise binary op on FP32 tensors with broadcasting; fast paths for equal
/// shapes and a scalar right-hand side.
pub fn binary_f32(a: &Tensor, b: &Tensor, f: impl Fn(f32, f32) -> f32) -> Result<Tensor, String> {
    let (x, y) = (f32s(a)?, f32s(b)?);
    if a.shape() == b.shape() {
        return tensor_f32(a.shape().to_vec(), x.iter().zip(y).map(|(&p, &q)| f(p, q)).collect());
    }
    if y.len() == 1 && b.shape().len() <= a.shape().len() {
        let q = y[0];
        return tensor_f32(a.shape().to_vec(), x.iter().map(|&p| f(p, q)).collect());
    }
    let mut data = Vec::new();
    let shape = for_each_broadcast(a.shape(), b.shape(), |i, j| data.push(f(x[i], y[j])))?;
    tensor_f32(shape, data)
}

/// The dtype of a float computation: FP32 only (the reference computes in FP32).
pub fn expect_f32(t: &ValueType) -> Result<(), String> {
    if t.dtype == DType::F32 { Ok(()) } else { Err(format!("expected FP32, got {}", t.dtype)) }
}

/// Concrete dims → symbolic shape.
pub fn dims_of(shape: &[usize]) -> Shape {
    shape.iter().map(|&d| Dim::fixed(d as i64)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broadcasting_matches_numpy() -> Result<(), String> {
        let a = tensor_f32(vec![2, 1, 3], vec![1., 2., 3., 4., 5., 6.])?;
        let b = tensor_f32(vec![2, 1], vec![10., 20.])?;
        let c = binary_f32(&a, &b, |x, y| x + y)?;
        assert_eq!(c.shape(), &[2, 2, 3]);
        assert_eq!(f32s(&c)?, &[11., 12., 13., 21., 22., 23., 14., 15., 16., 24., 25., 26.]);
        assert!(broadcast_dims(&[2, 3], &[4]).is_err());
        let s = broadcast_shapes(&[Dim::sym("batch"), Dim::fixed(1)], &[Dim::fixed(7)])?;
        assert_eq!(s, vec![Dim::sym("batch"), Dim::fixed(7)]);
        Ok(())
    }
}
