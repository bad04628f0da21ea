//! Concat along `axis` (negative allowed). Concatenating 1-d shape values
//! (symbolic or constant) yields a shape value: how exporters build Reshape
//! targets.

use crate::graph::{Dim, Node, ValueType};
use crate::ops::util::{input, norm_axis};
use crate::ops::{InferInput, Inferred, OpDef};
use crate::{Tensor, TensorData};

use super::{checked_numel, fresh, int_dims, is_int};

pub struct Concat;

/// `a + b` when both are multiples of the same monomial (`seq + seq` =
/// `2*seq`); otherwise the sum is not a monomial.
fn add_dims(a: &Dim, b: &Dim) -> Option<Dim> {
    if a.symbols() != b.symbols() {
        return None;
    }
    let unit = a.symbols().iter().fold(Dim::fixed(1), |acc, s| acc.mul(&Dim::sym(s.clone())));
    let (ka, kb) = (a.div(&unit)?.as_fixed()?, b.div(&unit)?.as_fixed()?);
    Some(unit.mul(&Dim::fixed(ka.checked_add(kb)?)))
}

fn concat_slices<T: Clone>(parts: &[&[T]], outer: usize, chunks: &[usize]) -> Vec<T> {
    let mut out = Vec::with_capacity(parts.iter().map(|p| p.len()).sum());
    for o in 0..outer {
        for (p, &c) in parts.iter().zip(chunks) {
            out.extend_from_slice(&p[o * c..(o + 1) * c]);
        }
    }
    out
}

/// Concatenates parts of variant `$v`, rejecting a part of any other dtype.
macro_rules! concat_as {
    ($v:ident, $parts:expr, $outer:expr, $chunks:expr) => {{
        let mut slices = Vec::with_capacity($parts.len());
        for p in $parts.iter() {
            match p.data() {
                TensorData::$v(x) => slices.push(x.as_slice()),
                other => return Err(format!("inputs mix {} and {}", $parts[0].dtype(), other.dtype())),
            }
        }
        TensorData::$v(concat_slices(&slices, $outer, $chunks))
    }};
}

impl OpDef for Concat {
    fn name(&self) -> &'static str {
        "Concat"
    }

    fn check(&self, node: &Node) -> Result<(), String> {
        match node.attrs.get("axis") {
            None => Err("attribute axis is required".into()),
            Some(_) => node.attrs.int("axis", 0).map(drop),
        }
    }

    fn infer(&self, node: &Node, inputs: &[InferInput<'_>]) -> Result<Vec<Inferred>, String> {
        let types: Vec<&ValueType> =
            (0..inputs.len()).map(|i| crate::ops::util::input_type(inputs, i)).collect::<Result<_, _>>()?;
        let first = types.first().ok_or("Concat needs at least one input")?;
        if let Some(t) = types.iter().find(|t| t.dtype != first.dtype) {
            return Err(format!("inputs mix {} and {}", first.dtype, t.dtype));
        }
        let shapes: Option<Vec<&Vec<Dim>>> = types.iter().map(|t| t.shape.as_ref()).collect();
        let Some(shapes) = shapes else {
            return Ok(vec![Inferred::new(ValueType { dtype: first.dtype, shape: None })]);
        };
        let rank = shapes[0].len();
        if let Some(s) = shapes.iter().find(|s| s.len() != rank) {
            return Err(format!("inputs have ranks {rank} and {}", s.len()));
        }
        let axis = norm_axis(node.attrs.int("axis", 0)?, rank)?;
        let mut shape = Vec::with_capacity(rank);
        for a in 0..rank {
            let dims = shapes.iter().map(|s| &s[a]);
            let d = if a == axis {
                dims.skip(1).try_fold(shapes[0][a].clone(), |acc, d| add_dims(&acc, d)).unwrap_or(fresh(node, a))
            } else {
                // Off-axis dims must agree; a fixed one pins a symbolic one.
                let fixed: Vec<i64> = dims.clone().filter_map(Dim::as_fixed).collect();
                if fixed.windows(2).any(|w| w[0] != w[1]) {
                    return Err(format!("inputs disagree on axis {a}: {fixed:?}"));
                }
                fixed.first().map(|&n| Dim::fixed(n)).unwrap_or_else(|| shapes[0][a].clone())
            };
            shape.push(d);
        }
        let mut sym = None;
        if is_int(first.dtype) && rank == 1 {
            let parts: Option<Vec<Vec<Dim>>> = (0..inputs.len()).map(|i| int_dims(inputs.get(i))).collect();
            sym = parts.map(|p| p.concat());
        }
        Ok(vec![Inferred { ty: ValueType::new(first.dtype, shape), sym }])
    }

    fn eval(&self, node: &Node, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, String> {
        let parts: Vec<&Tensor> = (0..inputs.len()).map(|i| input(inputs, i)).collect::<Result<_, _>>()?;
        let first = parts.first().ok_or("Concat needs at least one input")?;
        let rank = first.shape().len();
        let axis = norm_axis(node.attrs.int("axis", 0)?, rank)?;
        let mut shape = first.shape().to_vec();
        shape[axis] = 0;
        for p in &parts {
            let s = p.shape();
            let agrees = s.len() == rank && (0..rank).all(|a| a == axis || s[a] == first.shape()[a]);
            if !agrees {
                return Err(format!("cannot concatenate {:?} and {:?} on axis {axis}", first.shape(), s));
            }
            shape[axis] += s[axis];
        }
        checked_numel(&shape)?;
        let outer: usize = shape[..axis].iter().product();
        let inner: usize = shape[axis + 1..].iter().product();
        let chunks: Vec<usize> = parts.iter().map(|p| p.shape()[axis] * inner).collect();
        let data = match first.data() {
            TensorData::Bool(_) => concat_as!(Bool, parts, outer, &chunks),
            TensorData::U8(_) => concat_as!(U8, parts, outer, &chunks),
            TensorData::I8(_) => concat_as!(I8, parts, outer, &chunks),
            TensorData::I16(_) => concat_as!(I16, parts, outer, &chunks),
            TensorData::I32(_) => concat_as!(I32, parts, outer, &chunks),
            TensorData::I64(_) => concat_as!(I64, parts, outer, &chunks),
            TensorData::F16(_) => concat_as!(F16, parts, outer, &chunks),
            TensorData::F32(_) => concat_as!(F32, parts, outer, &chunks),
            TensorData::F64(_) => concat_as!(F64, parts, outer, &chunks),
            TensorData::Bytes(_) => concat_as!(Bytes, parts, outer, &chunks),
        };
        Ok(vec![Tensor::new(shape, data).map_err(|e| e.to_string())?])
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::*;
    use super::add_dims;
    use crate::DType;
    use crate::graph::Attr;
    use crate::ops::InferInput;
    use crate::ops::util::{f32s, i64s};

    #[test]
    fn concat_on_inner_and_negative_axes() -> Result<(), String> {
        let a = f32t(&[2, 1], &[1., 2.]);
        let b = f32t(&[2, 2], &[3., 4., 5., 6.]);
        let y = eval(&node("Concat", 2, &[("axis", Attr::Int(-1))]), &[&a, &b])?;
        assert_eq!(y.shape(), &[2, 3]);
        assert_eq!(f32s(&y)?, &[1., 3., 4., 2., 5., 6.]);
        let y = eval(&node("Concat", 3, &[("axis", Attr::Int(0))]), &[&b, &f32t(&[0, 2], &[]), &b])?;
        assert_eq!(y.shape(), &[4, 2]);
        assert_eq!(f32s(&y)?[4..], [3., 4., 5., 6.]);
        let y = eval(&node("Concat", 2, &[("axis", Attr::Int(0))]), &[&i64t(&[1], &[7]), &i64t(&[2], &[8, 9])])?;
        assert_eq!(i64s(&y)?, &[7, 8, 9]);
        Ok(())
    }

    #[test]
    fn concat_rejects_mismatches() {
        let n = node("Concat", 2, &[("axis", Attr::Int(0))]);
        assert!(eval(&n, &[&f32t(&[1, 2], &[0.; 2]), &f32t(&[1, 3], &[0.; 3])]).is_err());
        assert!(eval(&n, &[&f32t(&[1], &[0.]), &i64t(&[1], &[0])]).is_err());
        assert!(eval(&n, &[&f32t(&[1], &[0.]), &f32t(&[1, 1], &[0.])]).is_err());
        assert!(
            eval(&node("Concat", 2, &[("axis", Attr::Int(1))]), &[&f32t(&[1], &[0.]), &f32t(&[1], &[0.])]).is_err()
        );
        let missing = node("Concat", 2, &[]);
        assert!(crate::ops::registry().get("Concat").is_some_and(|op| op.check(&missing).is_err()));
    }

    #[test]
    fn concat_builds_shape_values_and_symbolic_shapes() -> Result<(), String> {
        let n = node("Concat", 3, &[("axis", Attr::Int(0))]);
        let st = sym_ty(DType::I64, vec![f(1)]);
        let (b, s) = ([d("batch")], [d("seq")]);
        let c = i64t(&[2], &[12, 32]);
        let ct = vt(&c);
        let out = infer(
            &n,
            &[
                InferInput { ty: Some(&st), constant: None, sym: Some(&b) },
                InferInput { ty: Some(&st), constant: None, sym: Some(&s) },
                konst(&c, &ct),
            ],
        )?;
        assert_eq!(out.ty.shape, Some(vec![f(4)]));
        assert_eq!(out.sym, Some(vec![d("batch"), d("seq"), f(12), f(32)]));
        // Without known contents: shape only.
        let plain = InferInput { ty: Some(&st), ..Default::default() };
        assert_eq!(infer(&n, &[plain, plain, konst(&c, &ct)])?.sym, None);
        // Symbolic sizes add up on the axis.
        let n = node("Concat", 2, &[("axis", Attr::Int(1))]);
        let xt = sym_ty(DType::F32, vec![d("batch"), d("seq")]);
        let x = InferInput { ty: Some(&xt), ..Default::default() };
        assert_eq!(infer(&n, &[x, x])?.ty.shape, Some(vec![d("batch"), d("seq").mul(&f(2))]));
        assert_eq!(add_dims(&f(3), &f(4)), Some(f(7)));
        assert_eq!(add_dims(&d("seq"), &f(4)), None);
        Ok(())
    }
}
