//! Range(start, limit, delta) for FP32, INT64 and INT32 scalars. Values
//! accumulate `start + delta + …` like ONNX Runtime, so FP32 outputs match it
//! bit for bit. `Range(0, seq, 1)` (position ids) has the symbolic length `seq`.

use crate::graph::{Dim, Node, ValueType};
use crate::ops::util::{input, input_type};
use crate::ops::{InferInput, Inferred, OpDef};
use crate::{DType, Tensor, TensorData};

use super::{MAX_ELEMENTS, fresh, int_dims, known_ints};

pub struct Range;

/// Number of elements, or an error for a zero step or an absurd length.
fn count(start: f64, limit: f64, delta: f64) -> Result<usize, String> {
    if delta == 0.0 || !delta.is_finite() {
        return Err(format!("Range step {delta}"));
    }
    let n = ((limit - start) / delta).ceil().max(0.0);
    if !n.is_finite() || n > MAX_ELEMENTS as f64 {
        return Err(format!("Range({start}, {limit}, {delta}) is too long"));
    }
    Ok(n as usize)
}

fn count_int(start: i64, limit: i64, delta: i64) -> Result<usize, String> {
    if delta == 0 {
        return Err("Range step 0".into());
    }
    let (s, l, d) = (i128::from(start), i128::from(limit), i128::from(delta));
    let n = if d > 0 { (l - s + d - 1) / d } else { (s - l - d - 1) / -d }.max(0);
    usize::try_from(n)
        .ok()
        .filter(|&n| n <= MAX_ELEMENTS)
        .ok_or_else(|| format!("Range({start}, {limit}, {delta}) is too long"))
}

fn scalar_f32(t: &Tensor) -> Result<f32, String> {
    match t.data() {
        TensorData::F32(v) if v.len() == 1 => Ok(v[0]),
        _ => Err(format!("expected an FP32 scalar, got {} {:?}", t.dtype(), t.shape())),
    }
}

fn scalar_int(t: &Tensor) -> Result<i64, String> {
    match t.data() {
        TensorData::I64(v) if v.len() == 1 => Ok(v[0]),
        TensorData::I32(v) if v.len() == 1 => Ok(i64::from(v[0])),
        _ => Err(format!("expected an integer scalar, got {} {:?}", t.dtype(), t.shape())),
    }
}

/// The output length at inference, symbolic where possible.
fn infer_len(node: &Node, inputs: &[InferInput<'_>], dtype: DType) -> Result<Dim, String> {
    if dtype == DType::F32 {
        let c: Option<Vec<&Tensor>> = (0..3).map(|i| inputs.get(i).and_then(|x| x.constant)).collect();
        return match c {
            Some(c) => {
                let (s, l, d) = (scalar_f32(c[0])?, scalar_f32(c[1])?, scalar_f32(c[2])?);
                Ok(Dim::fixed(count(0.0, f64::from(l - s), f64::from(d))? as i64))
            }
            None => Ok(fresh(node, 0)),
        };
    }
    let one = |i: usize| known_ints(inputs.get(i)).filter(|v| v.len() == 1).map(|v| v[0]);
    let limit = int_dims(inputs.get(1)).filter(|v| v.len() == 1).map(|v| v[0].clone());
    Ok(match (one(0), limit, one(2)) {
        (Some(s), Some(l), Some(d)) => match l.as_fixed() {
            Some(l) => Dim::fixed(count_int(s, l, d)? as i64),
            // Range(0, k·n, k) has n elements.
            None if s == 0 && d > 0 => l.div(&Dim::fixed(d)).unwrap_or_else(|| fresh(node, 0)),
            None => fresh(node, 0),
        },
        _ => fresh(node, 0),
    })
}

impl OpDef for Range {
    fn name(&self) -> &'static str {
        "Range"
    }

    fn infer(&self, node: &Node, inputs: &[InferInput<'_>]) -> Result<Vec<Inferred>, String> {
        let dtype = input_type(inputs, 0)?.dtype;
        for i in 1..3 {
            let t = input_type(inputs, i)?;
            if t.dtype != dtype {
                return Err(format!("start is {dtype} but input {i} is {}", t.dtype));
            }
        }
        if !matches!(dtype, DType::F32 | DType::I64 | DType::I32) {
            return Err(format!("Range on {dtype} is not supported"));
        }
        Ok(vec![Inferred::new(ValueType::new(dtype, vec![infer_len(node, inputs, dtype)?]))])
    }

    fn eval(&self, _node: &Node, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, String> {
        let (s, l, d) = (input(inputs, 0)?, input(inputs, 1)?, input(inputs, 2)?);
        let data = match s.dtype() {
            DType::F32 => {
                let (s, l, d) = (scalar_f32(s)?, scalar_f32(l)?, scalar_f32(d)?);
                // ONNX Runtime: ceil(double(limit - start) / delta), differences in FP32.
                let n = count(0.0, f64::from(l - s), f64::from(d))?;
                let mut v = Vec::with_capacity(n);
                let mut x = s;
                for _ in 0..n {
                    v.push(x);
                    x += d;
                }
                TensorData::F32(v)
            }
            DType::I64 | DType::I32 => {
                let (si, li, di) = (scalar_int(s)?, scalar_int(l)?, scalar_int(d)?);
                let n = count_int(si, li, di)?;
                let v = (0..n as i64).map(|i| si + i * di);
                if s.dtype() == DType::I64 {
                    TensorData::I64(v.collect())
                } else {
                    TensorData::I32(v.map(|x| x as i32).collect())
                }
            }
            other => return Err(format!("Range on {other} is not supported")),
        };
        if data.dtype() != l.dtype() || data.dtype() != d.dtype() {
            return Err(format!("Range inputs mix {}, {} and {}", s.dtype(), l.dtype(), d.dtype()));
        }
        let n = data.len();
        Ok(vec![Tensor::new(vec![n], data).map_err(|e| e.to_string())?])
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::*;
    use crate::ops::InferInput;
    use crate::ops::util::{f32s, i64s};
    use crate::{DType, Tensor, TensorData};

    fn s64(v: i64) -> Tensor {
        i64t(&[], &[v])
    }

    fn s32(v: f32) -> Tensor {
        f32t(&[], &[v])
    }

    #[test]
    fn range_counts_like_onnx() -> Result<(), String> {
        let n = node("Range", 3, &[]);
        assert_eq!(i64s(&eval(&n, &[&s64(0), &s64(5), &s64(1)])?)?, &[0, 1, 2, 3, 4]);
        assert_eq!(i64s(&eval(&n, &[&s64(10), &s64(4), &s64(-3)])?)?, &[10, 7]);
        assert_eq!(i64s(&eval(&n, &[&s64(3), &s64(3), &s64(1)])?)?, &[] as &[i64]);
        assert_eq!(i64s(&eval(&n, &[&s64(5), &s64(0), &s64(1)])?)?, &[] as &[i64]);
        assert_eq!(f32s(&eval(&n, &[&s32(1.0), &s32(2.0), &s32(0.25)])?)?, &[1.0, 1.25, 1.5, 1.75]);
        assert_eq!(f32s(&eval(&n, &[&s32(0.0), &s32(1.0), &s32(0.3)])?)?.len(), 4);
        let i32s = |v: i32| Tensor::new(vec![], TensorData::I32(vec![v])).map_err(|e| e.to_string());
        let y = eval(&n, &[&i32s(0)?, &i32s(6)?, &i32s(2)?])?;
        assert_eq!(y.data(), &TensorData::I32(vec![0, 2, 4]));
        Ok(())
    }

    #[test]
    fn range_rejects_bad_steps_and_mixed_types() {
        let n = node("Range", 3, &[]);
        assert!(eval(&n, &[&s64(0), &s64(5), &s64(0)]).is_err());
        assert!(eval(&n, &[&s32(0.), &s32(5.), &s32(0.)]).is_err());
        assert!(eval(&n, &[&s64(0), &s64(i64::MAX), &s64(1)]).is_err());
        assert!(eval(&n, &[&s64(0), &s32(5.), &s64(1)]).is_err());
        assert!(eval(&n, &[&i64t(&[2], &[0, 1]), &s64(5), &s64(1)]).is_err());
    }

    #[test]
    fn range_infers_symbolic_lengths() -> Result<(), String> {
        let n = node("Range", 3, &[]);
        let (z, one, two) = (s64(0), s64(1), s64(2));
        let (zt, ot, tt) = (vt(&z), vt(&one), vt(&two));
        let lt = sym_ty(DType::I64, vec![]);
        let seq = [d("seq")];
        let limit = InferInput { ty: Some(&lt), constant: None, sym: Some(&seq) };
        let out = infer(&n, &[konst(&z, &zt), limit, konst(&one, &ot)])?;
        assert_eq!(out.ty, sym_ty(DType::I64, vec![d("seq")]));
        let twice = [d("seq").mul(&f(2))];
        let limit = InferInput { ty: Some(&lt), constant: None, sym: Some(&twice) };
        assert_eq!(infer(&n, &[konst(&z, &zt), limit, konst(&two, &tt)])?.ty.shape, Some(vec![d("seq")]));
        let five = s64(5);
        let out = infer(&n, &[konst(&one, &ot), konst(&five, &vt(&five)), konst(&two, &tt)])?;
        assert_eq!(out.ty.shape, Some(vec![f(2)]));
        let (a, b, c) = (s32(0.), s32(1.), s32(0.25));
        let (at, bt, ct) = (vt(&a), vt(&b), vt(&c));
        assert_eq!(infer(&n, &[konst(&a, &at), konst(&b, &bt), konst(&c, &ct)])?.ty.shape, Some(vec![f(4)]));
        assert!(infer(&n, &[konst(&a, &at), konst(&five, &vt(&five)), konst(&c, &ct)]).is_err());
        Ok(())
    }
}
