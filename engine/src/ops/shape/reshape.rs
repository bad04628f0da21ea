//! Reshape (opset 14: `allowzero`). A 0 copies the input's dimension at the
//! same position unless `allowzero`, one -1 is inferred; with symbolic input
//! dims the -1 is solved as a monomial (`[batch, seq, 384]` → `[-1, 384]` gives
//! `batch*seq`).

use crate::Tensor;
use crate::graph::{Dim, Node, Shape, numel};
use crate::ops::util::{input, input_type, ints};
use crate::ops::{InferInput, Inferred, OpDef};

use super::{fresh, int_dims, is_int, reshaped, ty, vec_len};

pub struct Reshape;

fn allowzero(node: &Node) -> Result<bool, String> {
    match node.attrs.int("allowzero", 0)? {
        0 => Ok(false),
        1 => Ok(true),
        v => Err(format!("allowzero must be 0 or 1, got {v}")),
    }
}

/// The output shape for target `t`; unknowns become fresh symbols.
fn target_shape(node: &Node, input: Option<&Shape>, t: &[Dim], allowzero: bool) -> Result<Shape, String> {
    let mut out = Vec::with_capacity(t.len());
    let mut infer_at = None;
    for (i, d) in t.iter().enumerate() {
        match d.as_fixed() {
            Some(-1) => {
                if infer_at.is_some() {
                    return Err(format!("shape {t:?} has more than one -1"));
                }
                infer_at = Some(i);
                out.push(Dim::fixed(1));
            }
            Some(0) if !allowzero => match input {
                Some(s) => out.push(
                    s.get(i)
                        .cloned()
                        .ok_or_else(|| format!("shape entry {i} is 0 but the input has rank {}", s.len()))?,
                ),
                None => out.push(fresh(node, i)),
            },
            Some(n) if n < -1 => return Err(format!("shape entry {i} is {n}")),
            _ => out.push(d.clone()),
        }
    }
    if let Some(at) = infer_at {
        if allowzero && out.iter().any(|d| d.as_fixed() == Some(0)) {
            return Err("allowzero forbids a 0 together with a -1".into());
        }
        let known = numel(&out);
        out[at] = match input {
            None => fresh(node, at),
            Some(s) => {
                let total = numel(s);
                match total.div(&known) {
                    Some(q) => q,
                    None if total.is_fixed() && known.is_fixed() => {
                        return Err(format!("cannot reshape {total} elements to {t:?}"));
                    }
                    None => fresh(node, at),
                }
            }
        };
    } else if let Some(s) = input {
        let (a, b) = (numel(s), numel(&out));
        if a.symbols() == b.symbols() && a != b {
            return Err(format!("cannot reshape {a} elements to {b}"));
        }
    }
    Ok(out)
}

impl OpDef for Reshape {
    fn name(&self) -> &'static str {
        "Reshape"
    }

    fn check(&self, node: &Node) -> Result<(), String> {
        allowzero(node).map(drop)
    }

    fn infer(&self, node: &Node, inputs: &[InferInput<'_>]) -> Result<Vec<Inferred>, String> {
        let x = input_type(inputs, 0)?;
        let zero = allowzero(node)?;
        let shape = match int_dims(inputs.get(1)) {
            Some(t) => Some(target_shape(node, x.shape.as_ref(), &t, zero)?),
            None => vec_len(inputs.get(1)).map(|n| (0..n).map(|i| fresh(node, i)).collect()),
        };
        let Some(shape) = shape else {
            return Ok(vec![Inferred::new(crate::graph::ValueType { dtype: x.dtype, shape: None })]);
        };
        // A 0-d ↔ 1-d reshape of a shape value keeps its contents.
        let sym = match int_dims(inputs.first()) {
            Some(v) if is_int(x.dtype) && shape.len() <= 1 && numel(&shape).as_fixed() == Some(v.len() as i64) => {
                Some(v)
            }
            _ => None,
        };
        Ok(vec![Inferred { ty: ty(x.dtype, shape), sym }])
    }

    fn eval(&self, node: &Node, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, String> {
        let x = input(inputs, 0)?;
        let t: Vec<Dim> = ints(input(inputs, 1)?)?.into_iter().map(Dim::fixed).collect();
        let in_shape = crate::graph::fixed_shape(x.shape());
        let out = target_shape(node, Some(&in_shape), &t, allowzero(node)?)?;
        let dims = out
            .iter()
            .map(|d| d.as_fixed().and_then(|n| usize::try_from(n).ok()))
            .collect::<Option<Vec<usize>>>()
            .ok_or_else(|| format!("cannot reshape {:?} to {t:?}", x.shape()))?;
        if dims.iter().product::<usize>() != x.data().len() {
            return Err(format!("cannot reshape {:?} to {dims:?}", x.shape()));
        }
        Ok(vec![reshaped(x, dims)?])
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::*;
    use crate::DType;
    use crate::graph::{Attr, ValueType};
    use crate::ops::InferInput;
    use crate::ops::util::f32s;

    #[test]
    fn reshape_copies_zeros_and_infers_minus_one() -> Result<(), String> {
        let n = node("Reshape", 2, &[]);
        let x = f32t(&[2, 3, 4], &(0..24).map(|i| i as f32).collect::<Vec<_>>());
        let y = eval(&n, &[&x, &i64t(&[2], &[0, -1])])?;
        assert_eq!(y.shape(), &[2, 12]);
        assert_eq!(f32s(&y)?[13], 13.0);
        let y = eval(&n, &[&x, &i64t(&[3], &[-1, 0, 2])])?;
        assert_eq!(y.shape(), &[4, 3, 2]);
        // allowzero: a 0 is a real zero-sized dimension.
        let z = node("Reshape", 2, &[("allowzero", Attr::Int(1))]);
        let empty = f32t(&[0, 3], &[]);
        assert_eq!(eval(&z, &[&empty, &i64t(&[2], &[3, 0])])?.shape(), &[3, 0]);
        assert!(eval(&z, &[&empty, &i64t(&[2], &[0, -1])]).is_err());
        Ok(())
    }

    #[test]
    fn bad_reshapes_are_errors() {
        let n = node("Reshape", 2, &[]);
        let x = f32t(&[2, 3], &[0.; 6]);
        assert!(eval(&n, &[&x, &i64t(&[2], &[4, 2])]).is_err());
        assert!(eval(&n, &[&x, &i64t(&[2], &[-1, 4])]).is_err());
        assert!(eval(&n, &[&x, &i64t(&[2], &[-1, -1])]).is_err());
        assert!(eval(&n, &[&x, &i64t(&[3], &[0, 0, 0])]).is_err());
        assert!(eval(&n, &[&x, &i64t(&[2], &[-2, -3])]).is_err());
        assert!(eval(&n, &[&x, &f32t(&[2], &[3., 2.])]).is_err());
        let bad = node("Reshape", 2, &[("allowzero", Attr::Int(3))]);
        assert!(crate::ops::registry().get("Reshape").map(|op| op.check(&bad).is_err()).unwrap_or(false));
    }

    #[test]
    fn reshape_infers_symbolic_shapes() -> Result<(), String> {
        let n = node("Reshape", 2, &[]);
        let xt = sym_ty(DType::F32, vec![d("batch"), d("seq"), f(384)]);
        let x = InferInput { ty: Some(&xt), ..Default::default() };
        // A constant target with -1 → batch*seq.
        let t = i64t(&[2], &[-1, 384]);
        let tt = vt(&t);
        let out = infer(&n, &[x, konst(&t, &tt)])?;
        assert_eq!(out.ty.shape, Some(vec![d("batch").mul(&d("seq")), f(384)]));
        // A symbolic target.
        let st = sym_ty(DType::I64, vec![f(4)]);
        let sym = [d("batch"), d("seq"), f(12), f(32)];
        let s = InferInput { ty: Some(&st), constant: None, sym: Some(&sym) };
        assert_eq!(infer(&n, &[x, s])?.ty.shape, Some(sym.to_vec()));
        // 0 copies a symbolic dim; -1 solved symbolically.
        let t = i64t(&[4], &[0, 0, 12, -1]);
        let tt = vt(&t);
        assert_eq!(infer(&n, &[x, konst(&t, &tt)])?.ty.shape, Some(vec![d("batch"), d("seq"), f(12), f(32)]));
        // Unknown target contents: rank from the target's length.
        let out = infer(&n, &[x, InferInput { ty: Some(&st), ..Default::default() }])?;
        assert_eq!(out.ty.shape.map(|s| s.len()), Some(4));
        // Inconsistent fixed sizes.
        let ft = ValueType::new(DType::F32, vec![f(2), f(3)]);
        let t = i64t(&[1], &[7]);
        let tt = vt(&t);
        assert!(infer(&n, &[InferInput { ty: Some(&ft), ..Default::default() }, konst(&t, &tt)]).is_err());
        Ok(())
    }

    #[test]
    fn reshape_keeps_sym_between_0d_and_1d() -> Result<(), String> {
        let n = node("Reshape", 2, &[]);
        let st = sym_ty(DType::I64, vec![]);
        let sym = [d("seq")];
        let s = InferInput { ty: Some(&st), constant: None, sym: Some(&sym) };
        let t = i64t(&[1], &[1]);
        let tt = vt(&t);
        let out = infer(&n, &[s, konst(&t, &tt)])?;
        assert_eq!(out.ty.shape, Some(vec![f(1)]));
        assert_eq!(out.sym, Some(vec![d("seq")]));
        Ok(())
    }
}
