//! Unsqueeze: axes as input (opset 13) or attribute (before). Unsqueezing a
//! 0-d shape value gives a 1-d one with the same contents.

use crate::Tensor;
use crate::graph::{Dim, Node, ValueType};
use crate::ops::util::{input, input_type};
use crate::ops::{InferInput, Inferred, OpDef};

use super::{fresh, infer_input, int_dims, is_int, known_ints, norm_axes, opt_ints, reshaped, vec_len};

pub struct Unsqueeze;

/// `shape` with a 1 inserted at each of `axes` (axes of the output).
fn unsqueezed<T: Clone>(shape: &[T], axes: &[i64], one: T) -> Result<Vec<T>, String> {
    let rank = shape.len() + axes.len();
    let axes = norm_axes(axes, rank)?;
    let mut dims = shape.iter();
    (0..rank)
        .map(|a| if axes.contains(&a) { Some(one.clone()) } else { dims.next().cloned() })
        .collect::<Option<Vec<T>>>()
        .ok_or_else(|| format!("axes {axes:?} do not fit rank {}", shape.len()))
}

fn attr_axes(node: &Node) -> Result<Option<Vec<i64>>, String> {
    Ok(node.attrs.ints("axes")?.map(<[i64]>::to_vec))
}

impl OpDef for Unsqueeze {
    fn name(&self) -> &'static str {
        "Unsqueeze"
    }

    fn check(&self, node: &Node) -> Result<(), String> {
        if node.input(1).is_none() && attr_axes(node)?.is_none() {
            return Err("Unsqueeze needs axes".into());
        }
        Ok(())
    }

    fn infer(&self, node: &Node, inputs: &[InferInput<'_>]) -> Result<Vec<Inferred>, String> {
        let x = input_type(inputs, 0)?;
        let axes = match infer_input(node, inputs, 1) {
            Some(a) => known_ints(Some(a)),
            None => attr_axes(node)?,
        };
        let shape = match (&x.shape, axes) {
            (Some(s), Some(axes)) => Some(unsqueezed(s, &axes, Dim::fixed(1))?),
            (Some(s), None) => vec_len(inputs.get(1)).map(|n| (0..s.len() + n).map(|a| fresh(node, a)).collect()),
            (None, _) => None,
        };
        let sym = match (&shape, int_dims(inputs.first())) {
            (Some(s), Some(v)) if is_int(x.dtype) && s.len() <= 1 => Some(v),
            _ => None,
        };
        Ok(vec![Inferred { ty: ValueType { dtype: x.dtype, shape }, sym }])
    }

    fn eval(&self, node: &Node, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, String> {
        let x = input(inputs, 0)?;
        let axes = match opt_ints(inputs, 1)? {
            Some(a) => a,
            None => attr_axes(node)?.ok_or("Unsqueeze needs axes")?,
        };
        Ok(vec![reshaped(x, unsqueezed(x.shape(), &axes, 1)?)?])
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::*;
    use crate::DType;
    use crate::graph::Attr;
    use crate::ops::InferInput;

    #[test]
    fn unsqueeze_inserts_ones_at_output_axes() -> Result<(), String> {
        let n = node("Unsqueeze", 2, &[]);
        let x = f32t(&[2, 3], &[0.; 6]);
        assert_eq!(eval(&n, &[&x, &i64t(&[2], &[0, -1])])?.shape(), &[1, 2, 3, 1]);
        assert_eq!(eval(&n, &[&x, &i64t(&[2], &[3, 1])])?.shape(), &[2, 1, 3, 1]);
        assert!(eval(&n, &[&x, &i64t(&[1], &[3])]).is_err());
        assert!(eval(&n, &[&x, &i64t(&[2], &[1, -3])]).is_err());
        let old = node("Unsqueeze", 1, &[("axes", Attr::Ints(vec![1]))]);
        assert_eq!(eval(&old, &[&x])?.shape(), &[2, 1, 3]);
        let none = node("Unsqueeze", 1, &[]);
        assert!(eval(&none, &[&x]).is_err());
        assert!(crate::ops::registry().get("Unsqueeze").is_some_and(|op| op.check(&none).is_err()));
        Ok(())
    }

    #[test]
    fn unsqueeze_infers_and_keeps_sym() -> Result<(), String> {
        let n = node("Unsqueeze", 2, &[]);
        let axes = i64t(&[1], &[0]);
        let at = vt(&axes);
        let st = sym_ty(DType::I64, vec![]);
        let b = [d("batch")];
        let out = infer(&n, &[InferInput { ty: Some(&st), constant: None, sym: Some(&b) }, konst(&axes, &at)])?;
        assert_eq!(out.ty.shape, Some(vec![f(1)]));
        assert_eq!(out.sym, Some(vec![d("batch")]));
        // The attention-mask unsqueeze: [batch, seq] → [batch, 1, 1, seq].
        let axes = i64t(&[2], &[1, 2]);
        let at = vt(&axes);
        let mt = sym_ty(DType::I64, vec![d("batch"), d("seq")]);
        let out = infer(&n, &[InferInput { ty: Some(&mt), ..Default::default() }, konst(&axes, &at)])?;
        assert_eq!(out.ty.shape, Some(vec![d("batch"), f(1), f(1), d("seq")]));
        assert_eq!(out.sym, None);
        Ok(())
    }
}
