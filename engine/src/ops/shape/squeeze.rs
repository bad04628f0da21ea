//! Squeeze: axes as input (opset 13), attribute (before) or absent (every
//! dimension of size 1). Squeezing a `[1]` shape value keeps its contents.

use crate::Tensor;
use crate::graph::{Dim, Node, ValueType};
use crate::ops::util::{input, input_type};
use crate::ops::{InferInput, Inferred, OpDef};

use super::{fresh, infer_input, int_dims, is_int, known_ints, norm_axes, opt_ints, reshaped};

pub struct Squeeze;

/// Which axes go: the given ones (each must be 1 where known) or every
/// dimension known to be 1.
fn squeezed_axes(shape: &[Dim], axes: Option<&[i64]>) -> Result<Vec<usize>, String> {
    let Some(axes) = axes else {
        return Ok((0..shape.len()).filter(|&a| shape[a].as_fixed() == Some(1)).collect());
    };
    let axes = norm_axes(axes, shape.len())?;
    if let Some(&a) = axes.iter().find(|&&a| shape[a].as_fixed().is_some_and(|n| n != 1)) {
        return Err(format!("cannot squeeze axis {a} of size {}", shape[a]));
    }
    Ok(axes)
}

fn attr_axes(node: &Node) -> Result<Option<Vec<i64>>, String> {
    Ok(node.attrs.ints("axes")?.map(<[i64]>::to_vec))
}

impl OpDef for Squeeze {
    fn name(&self) -> &'static str {
        "Squeeze"
    }

    fn check(&self, node: &Node) -> Result<(), String> {
        attr_axes(node).map(drop)
    }

    fn infer(&self, node: &Node, inputs: &[InferInput<'_>]) -> Result<Vec<Inferred>, String> {
        let x = input_type(inputs, 0)?;
        let Some(s) = &x.shape else {
            return Ok(vec![Inferred::new(ValueType { dtype: x.dtype, shape: None })]);
        };
        let axes = match infer_input(node, inputs, 1) {
            None => Some(attr_axes(node)?),
            Some(a) => known_ints(Some(a)).map(Some),
        };
        let shape: Vec<Dim> = match axes {
            Some(axes) => {
                let gone = squeezed_axes(s, axes.as_deref())?;
                (0..s.len()).filter(|a| !gone.contains(a)).map(|a| s[a].clone()).collect()
            }
            None => match super::vec_len(inputs.get(1)) {
                Some(n) if n <= s.len() => (0..s.len() - n).map(|a| fresh(node, a)).collect(),
                _ => return Ok(vec![Inferred::new(ValueType { dtype: x.dtype, shape: None })]),
            },
        };
        let sym = match int_dims(inputs.first()) {
            Some(v) if is_int(x.dtype) && shape.is_empty() && v.len() == 1 => Some(v),
            _ => None,
        };
        Ok(vec![Inferred { ty: ValueType::new(x.dtype, shape), sym }])
    }

    fn eval(&self, node: &Node, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, String> {
        let x = input(inputs, 0)?;
        let axes = match opt_ints(inputs, 1)? {
            Some(a) => Some(a),
            None => attr_axes(node)?,
        };
        let gone = squeezed_axes(&crate::graph::fixed_shape(x.shape()), axes.as_deref())?;
        let shape = (0..x.shape().len()).filter(|a| !gone.contains(a)).map(|a| x.shape()[a]).collect();
        Ok(vec![reshaped(x, shape)?])
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::*;
    use crate::DType;
    use crate::graph::Attr;
    use crate::ops::InferInput;

    #[test]
    fn squeeze_given_axes_all_ones_or_attribute() -> Result<(), String> {
        let x = f32t(&[1, 3, 1, 2], &[0.; 6]);
        let n = node("Squeeze", 2, &[]);
        assert_eq!(eval(&n, &[&x, &i64t(&[1], &[-2])])?.shape(), &[1, 3, 2]);
        assert_eq!(eval(&node("Squeeze", 1, &[]), &[&x])?.shape(), &[3, 2]);
        let old = node("Squeeze", 1, &[("axes", Attr::Ints(vec![0]))]);
        assert_eq!(eval(&old, &[&x])?.shape(), &[3, 1, 2]);
        assert!(eval(&n, &[&x, &i64t(&[1], &[1])]).is_err());
        assert!(eval(&n, &[&x, &i64t(&[1], &[4])]).is_err());
        assert!(eval(&n, &[&x, &i64t(&[2], &[0, -4])]).is_err());
        Ok(())
    }

    #[test]
    fn squeeze_infers_and_keeps_sym() -> Result<(), String> {
        let n = node("Squeeze", 2, &[]);
        let axes = i64t(&[1], &[0]);
        let at = vt(&axes);
        let st = sym_ty(DType::I64, vec![f(1)]);
        let s = [d("seq")];
        let out = infer(&n, &[InferInput { ty: Some(&st), constant: None, sym: Some(&s) }, konst(&axes, &at)])?;
        assert_eq!(out.ty.shape, Some(vec![]));
        assert_eq!(out.sym, Some(vec![d("seq")]));
        let xt = sym_ty(DType::F32, vec![d("batch"), f(1), f(384)]);
        let x = InferInput { ty: Some(&xt), ..Default::default() };
        let one = i64t(&[1], &[1]);
        let ot = vt(&one);
        assert_eq!(infer(&n, &[x, konst(&one, &ot)])?.ty.shape, Some(vec![d("batch"), f(384)]));
        assert!(infer(&n, &[x, konst(&i64t(&[1], &[2]), &ot)]).is_err());
        Ok(())
    }
}
