//! Slice (opset 13 inputs `starts, ends, axes?, steps?`; the opset-1 attribute
//! form is accepted too). Starts and ends clamp like ONNX, steps may be
//! negative. A slice of a shape value with known bounds keeps its symbolic
//! contents; a symbolic `end` gives a symbolic length (`pos[:, 0:seq]`).

use crate::Tensor;
use crate::graph::{Dim, Node, ValueType};
use crate::ops::util::{input, input_type};
use crate::ops::{InferInput, Inferred, OpDef};

use super::{
    fresh, infer_input, int_dims, is_int, known_ints, norm_axes, opt_ints, row_strides, strided_indices, take,
};

pub struct Slice;

/// An end this large means "to the end" whatever the dimension (exporters
/// write INT64_MAX or INT32_MAX).
const HUGE: i64 = i32::MAX as i64;

/// First element and element count a slice takes from a dimension of size `d`.
fn slice_dim(d: i64, start: i64, end: i64, step: i64) -> Result<(i64, i64), String> {
    if step == 0 {
        return Err("slice step 0".into());
    }
    let (d, step) = (i128::from(d), i128::from(step));
    let norm = |x: i64| if x < 0 { i128::from(x) + d } else { i128::from(x) };
    let (mut s, mut e) = (norm(start), norm(end));
    let len = if step > 0 {
        s = s.clamp(0, d);
        e = e.clamp(0, d);
        if e > s { (e - s - 1) / step + 1 } else { 0 }
    } else {
        if d == 0 {
            return Ok((0, 0));
        }
        s = s.clamp(0, d - 1);
        e = e.clamp(-1, d - 1);
        if s > e { (s - e - 1) / -step + 1 } else { 0 }
    };
    // Both fit: 0 ≤ s < d and len ≤ d.
    Ok((s as i64, len as i64))
}

/// Symbolic length of a slice; `None` when it is not a monomial.
fn slice_len(d: &Dim, start: &Dim, end: &Dim, step: i64) -> Result<Option<Dim>, String> {
    if let (Some(d), Some(s), Some(e)) = (d.as_fixed(), start.as_fixed(), end.as_fixed()) {
        return Ok(Some(Dim::fixed(slice_dim(d, s, e, step)?.1)));
    }
    let to_end = |e: &Dim| e == d || e.as_fixed().is_some_and(|e| e >= HUGE);
    Ok(match (start.as_fixed(), step) {
        (Some(0), 1) if to_end(end) => Some(d.clone()),
        // `x[0:seq]`: assumes the bound fits the dimension, as the model does.
        (Some(0), 1) if !end.is_fixed() => Some(end.clone()),
        // `x[-k:]` is min(k, d): not a monomial, so it gets a fresh symbol (a fixed k
        // would be wrong for short inputs, and shape folding would bake it in).
        (Some(-1), -1) if end.as_fixed().is_some_and(|e| e <= -HUGE) => Some(d.clone()),
        _ => None,
    })
}

/// Starts, ends, axes and steps (`None`: not known at inference).
type Params<T> = (Option<Vec<T>>, Option<Vec<T>>, Option<Vec<i64>>, Option<Vec<i64>>);

/// Starts, ends, normalised axes and steps, all of one length.
type Resolved<T> = (Vec<T>, Vec<T>, Vec<usize>, Vec<i64>);

fn infer_params(node: &Node, inputs: &[InferInput<'_>]) -> Result<Params<Dim>, String> {
    if infer_input(node, inputs, 1).is_none() {
        let attr = |k: &str| -> Result<Option<Vec<i64>>, String> { Ok(node.attrs.ints(k)?.map(<[i64]>::to_vec)) };
        let dims = |v: Option<Vec<i64>>| v.map(|v| v.into_iter().map(Dim::fixed).collect());
        return Ok((dims(attr("starts")?), dims(attr("ends")?), attr("axes")?, None));
    }
    let n = vec_len_of(inputs, 1);
    let starts = int_dims(inputs.get(1));
    let ends = int_dims(inputs.get(2));
    let axes = match infer_input(node, inputs, 3) {
        None => n.map(|n| (0..n as i64).collect()),
        Some(a) => known_ints(Some(a)),
    };
    let steps = match infer_input(node, inputs, 4) {
        None => n.map(|n| vec![1; n]),
        Some(s) => known_ints(Some(s)),
    };
    Ok((starts, ends, axes, steps))
}

fn vec_len_of(inputs: &[InferInput<'_>], i: usize) -> Option<usize> {
    int_dims(inputs.get(i)).map(|v| v.len()).or_else(|| super::vec_len(inputs.get(i)))
}

fn eval_params(node: &Node, inputs: &[Option<&Tensor>]) -> Result<Params<i64>, String> {
    if inputs.get(1).copied().flatten().is_none() {
        let attr = |k: &str| -> Result<Option<Vec<i64>>, String> { Ok(node.attrs.ints(k)?.map(<[i64]>::to_vec)) };
        return Ok((attr("starts")?, attr("ends")?, attr("axes")?, None));
    }
    Ok((opt_ints(inputs, 1)?, opt_ints(inputs, 2)?, opt_ints(inputs, 3)?, opt_ints(inputs, 4)?))
}

/// Checks the parameter lists agree; fills default axes and steps.
fn resolve<T: Clone>(p: Params<T>, rank: usize) -> Result<Resolved<T>, String> {
    let (Some(starts), Some(ends)) = (p.0, p.1) else { return Err("slice needs starts and ends".into()) };
    let n = starts.len();
    let axes = norm_axes(&p.2.unwrap_or_else(|| (0..n as i64).collect()), rank)?;
    let steps = p.3.unwrap_or_else(|| vec![1; n]);
    if ends.len() != n || axes.len() != n || steps.len() != n {
        return Err(format!(
            "starts, ends, axes and steps have {n}, {}, {}, {} entries",
            ends.len(),
            axes.len(),
            steps.len()
        ));
    }
    Ok((starts, ends, axes, steps))
}

impl OpDef for Slice {
    fn name(&self) -> &'static str {
        "Slice"
    }

    fn check(&self, node: &Node) -> Result<(), String> {
        let form = node.inputs.len() == 1;
        if form && (node.attrs.ints("starts")?.is_none() || node.attrs.ints("ends")?.is_none()) {
            return Err("Slice needs starts and ends".into());
        }
        Ok(())
    }

    fn infer(&self, node: &Node, inputs: &[InferInput<'_>]) -> Result<Vec<Inferred>, String> {
        let x = input_type(inputs, 0)?;
        let Some(shape) = &x.shape else {
            return Ok(vec![Inferred::new(ValueType { dtype: x.dtype, shape: None })]);
        };
        let rank = shape.len();
        let (starts, ends, axes, steps) = infer_params(node, inputs)?;
        let Some(axes) = axes else {
            let all = (0..rank).map(|a| fresh(node, a)).collect();
            return Ok(vec![Inferred::new(ValueType::new(x.dtype, all))]);
        };
        let n = axes.len();
        let unknown = |v: Option<Vec<Dim>>| v.unwrap_or_else(|| (0..n).map(|i| fresh(node, format!("b{i}"))).collect());
        let steps = steps.unwrap_or_else(|| vec![0; n]); // 0: unknown, never computed with
        let (starts, ends, axes, steps) =
            resolve((Some(unknown(starts)), Some(unknown(ends)), Some(axes), Some(steps)), rank)?;
        let mut out = shape.clone();
        for i in 0..n {
            let a = axes[i];
            let len = if steps[i] == 0 { None } else { slice_len(&shape[a], &starts[i], &ends[i], steps[i])? };
            out[a] = len.unwrap_or_else(|| fresh(node, a));
        }
        let mut sym = None;
        if let (true, 1, 1, Some(data)) = (is_int(x.dtype), rank, n, int_dims(inputs.first())) {
            let fixed = |v: &[Dim]| v.iter().map(Dim::as_fixed).collect::<Option<Vec<i64>>>();
            if let (Some(s), Some(e), true) = (fixed(&starts), fixed(&ends), steps.iter().all(|&k| k != 0)) {
                let (start, len) = slice_dim(data.len() as i64, s[0], e[0], steps[0])?;
                sym = Some((0..len).map(|j| data[(start + j * steps[0]) as usize].clone()).collect());
            }
        }
        Ok(vec![Inferred { ty: ValueType::new(x.dtype, out), sym }])
    }

    fn eval(&self, node: &Node, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, String> {
        let x = input(inputs, 0)?;
        let rank = x.shape().len();
        let (starts, ends, axes, steps) = resolve(eval_params(node, inputs)?, rank)?;
        let strides = row_strides(x.shape());
        let mut out = x.shape().to_vec();
        let mut view: Vec<i64> = strides.iter().map(|&s| s as i64).collect();
        let mut base = 0i64;
        for i in 0..axes.len() {
            let a = axes[i];
            let (s, len) = slice_dim(x.shape()[a] as i64, starts[i], ends[i], steps[i])?;
            out[a] = len as usize;
            base += s * strides[a] as i64;
            view[a] = strides[a] as i64 * steps[i];
        }
        let idx = strided_indices(&out, &view, base)?;
        Ok(vec![take(x, out, &idx)?])
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::*;
    use super::slice_dim;
    use crate::DType;
    use crate::graph::Attr;
    use crate::ops::InferInput;
    use crate::ops::util::{f32s, i64s};

    fn x34() -> crate::Tensor {
        f32t(&[3, 4], &(0..12).map(|i| i as f32).collect::<Vec<_>>())
    }

    #[test]
    fn slice_basic_axes_and_steps() -> Result<(), String> {
        let n = node("Slice", 5, &[]);
        let y = eval(&n, &[&x34(), &i64t(&[1], &[1]), &i64t(&[1], &[3]), &i64t(&[1], &[-1]), &i64t(&[1], &[2])])?;
        assert_eq!(y.shape(), &[3, 1]);
        assert_eq!(f32s(&y)?, &[1., 5., 9.]);
        // Default axes and steps: both dims.
        let n3 = node("Slice", 3, &[]);
        let y = eval(&n3, &[&x34(), &i64t(&[2], &[1, -2]), &i64t(&[2], &[i64::MAX, 4])])?;
        assert_eq!(y.shape(), &[2, 2]);
        assert_eq!(f32s(&y)?, &[6., 7., 10., 11.]);
        // The attribute form.
        let old = node("Slice", 1, &[("starts", Attr::Ints(vec![2])), ("ends", Attr::Ints(vec![10]))]);
        assert_eq!(f32s(&eval(&old, &[&x34()])?)?, &[8., 9., 10., 11.]);
        Ok(())
    }

    #[test]
    fn slice_clamps_and_steps_backwards() -> Result<(), String> {
        let n = node("Slice", 5, &[]);
        let v = i64t(&[5], &[0, 1, 2, 3, 4]);
        let run = |s: i64, e: i64, k: i64| -> Result<Vec<i64>, String> {
            let y = eval(&n, &[&v, &i64t(&[1], &[s]), &i64t(&[1], &[e]), &i64t(&[1], &[0]), &i64t(&[1], &[k])])?;
            Ok(i64s(&y)?.to_vec())
        };
        assert_eq!(run(-100, 100, 1)?, vec![0, 1, 2, 3, 4]);
        assert_eq!(run(i64::MIN, i64::MAX, 2)?, vec![0, 2, 4]);
        assert_eq!(run(-1, i64::MIN, -1)?, vec![4, 3, 2, 1, 0]);
        assert_eq!(run(100, 0, -2)?, vec![4, 2]);
        assert_eq!(run(3, 1, 1)?, Vec::<i64>::new());
        assert_eq!(run(1, 3, -1)?, Vec::<i64>::new());
        assert_eq!(run(4, -6, i64::MIN)?, vec![4]);
        assert!(run(0, 5, 0).is_err());
        assert_eq!(slice_dim(0, 0, -1, -1)?, (0, 0));
        Ok(())
    }

    #[test]
    fn slice_rejects_bad_parameters() {
        let n = node("Slice", 4, &[]);
        let x = x34();
        assert!(eval(&n, &[&x, &i64t(&[1], &[0]), &i64t(&[2], &[1, 1]), &i64t(&[1], &[0])]).is_err());
        assert!(eval(&n, &[&x, &i64t(&[1], &[0]), &i64t(&[1], &[1]), &i64t(&[1], &[2])]).is_err());
        assert!(eval(&n, &[&x, &i64t(&[2], &[0, 0]), &i64t(&[2], &[1, 1]), &i64t(&[2], &[0, -2])]).is_err());
        let no_bounds = node("Slice", 1, &[]);
        assert!(crate::ops::registry().get("Slice").is_some_and(|op| op.check(&no_bounds).is_err()));
    }

    #[test]
    fn slice_infers_symbolic_lengths_and_sym() -> Result<(), String> {
        let n = node("Slice", 4, &[]);
        let (zero, one) = (i64t(&[1], &[0]), i64t(&[1], &[1]));
        let (zt, ot) = (vt(&zero), vt(&one));
        // position_ids[:, 0:seq] of a [1, 512] constant.
        let pt = sym_ty(DType::I64, vec![f(1), f(512)]);
        let et = sym_ty(DType::I64, vec![f(1)]);
        let seq = [d("seq")];
        let end = InferInput { ty: Some(&et), constant: None, sym: Some(&seq) };
        let p = InferInput { ty: Some(&pt), ..Default::default() };
        assert_eq!(infer(&n, &[p, konst(&zero, &zt), end, konst(&one, &ot)])?.ty.shape, Some(vec![f(1), d("seq")]));
        // x[:, 1:] of [batch, seq]: not a monomial, a fresh symbol.
        let big = i64t(&[1], &[i64::MAX]);
        let bt = vt(&big);
        let xt = sym_ty(DType::F32, vec![d("batch"), d("seq")]);
        let x = InferInput { ty: Some(&xt), ..Default::default() };
        let out = infer(&n, &[x, konst(&one, &ot), konst(&big, &bt), konst(&one, &ot)])?.ty.shape.ok_or("no shape")?;
        assert_eq!(out[0], d("batch"));
        assert!(!out[1].is_fixed() && out[1] != d("seq"));
        // x[:, 0:] keeps seq.
        let out = infer(&n, &[x, konst(&zero, &zt), konst(&big, &bt), konst(&one, &ot)])?;
        assert_eq!(out.ty.shape, Some(vec![d("batch"), d("seq")]));
        // x[:, -3:] is min(3, seq): a fresh symbol, never the constant 3.
        let (m3, m1) = (i64t(&[1], &[-3]), i64t(&[1], &[1]));
        let (m3t, m1t) = (vt(&m3), vt(&m1));
        let out = infer(&n, &[x, konst(&m3, &m3t), konst(&big, &bt), konst(&m1, &m1t)])?.ty.shape.ok_or("no shape")?;
        assert!(!out[1].is_fixed() && out[1] != d("seq"), "{out:?}");
        // Shape(x)[1:] of a shape value.
        let st = sym_ty(DType::I64, vec![f(3)]);
        let sv = [d("batch"), d("seq"), f(384)];
        let s = InferInput { ty: Some(&st), constant: None, sym: Some(&sv) };
        let out = infer(&n, &[s, konst(&one, &ot), konst(&big, &bt), konst(&zero, &zt)])?;
        assert_eq!(out.ty.shape, Some(vec![f(2)]));
        assert_eq!(out.sym, Some(vec![d("seq"), f(384)]));
        Ok(())
    }
}
