//! Expand: broadcast the input to a shape given as a tensor (multidirectional:
//! a 1 in the shape keeps the input's dimension). The shape may be symbolic.

use crate::Tensor;
use crate::graph::{Node, ValueType};
use crate::ops::util::{broadcast_dims, broadcast_shapes, input, input_type, ints};
use crate::ops::{InferInput, Inferred, OpDef};

use super::where_op::broadcast_index;
use super::{checked_numel, fresh, int_dims, take, vec_len};

pub struct Expand;

impl OpDef for Expand {
    fn name(&self) -> &'static str {
        "Expand"
    }

    fn infer(&self, node: &Node, inputs: &[InferInput<'_>]) -> Result<Vec<Inferred>, String> {
        let x = input_type(inputs, 0)?;
        let target = match int_dims(inputs.get(1)) {
            Some(t) => {
                if let Some(n) = t.iter().filter_map(|d| d.as_fixed()).find(|&n| n < 0) {
                    return Err(format!("cannot expand to a dimension of {n}"));
                }
                Some(t)
            }
            None => vec_len(inputs.get(1)).map(|n| (0..n).map(|i| fresh(node, i)).collect()),
        };
        let shape = match (&x.shape, target) {
            (Some(s), Some(t)) => Some(broadcast_shapes(s, &t)?),
            _ => None,
        };
        Ok(vec![Inferred::new(ValueType { dtype: x.dtype, shape })])
    }

    fn eval(&self, _node: &Node, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, String> {
        let x = input(inputs, 0)?;
        let target: Vec<usize> = ints(input(inputs, 1)?)?
            .into_iter()
            .map(|d| usize::try_from(d).map_err(|_| format!("cannot expand to a dimension of {d}")))
            .collect::<Result<_, _>>()?;
        let out = broadcast_dims(x.shape(), &target)?;
        checked_numel(&out)?;
        let idx = broadcast_index(x.shape(), &out)?;
        Ok(vec![take(x, out, &idx)?])
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::*;
    use crate::DType;
    use crate::ops::InferInput;
    use crate::ops::util::{f32s, i64s};

    #[test]
    fn expand_broadcasts_both_ways() -> Result<(), String> {
        let n = node("Expand", 2, &[]);
        let x = f32t(&[3, 1], &[1., 2., 3.]);
        let y = eval(&n, &[&x, &i64t(&[2], &[1, 1])])?;
        assert_eq!(y.shape(), &[3, 1]);
        let y = eval(&n, &[&x, &i64t(&[3], &[2, 1, 2])])?;
        assert_eq!(y.shape(), &[2, 3, 2]);
        assert_eq!(f32s(&y)?[..6], [1., 1., 2., 2., 3., 3.]);
        // A target smaller than the input: the input's dims stay.
        let y = eval(&n, &[&i64t(&[1, 2], &[5, 6]), &i64t(&[1], &[1])])?;
        assert_eq!(y.shape(), &[1, 2]);
        assert_eq!(i64s(&y)?, &[5, 6]);
        assert_eq!(eval(&n, &[&x, &i64t(&[1], &[2])])?.shape(), &[3, 2]);
        assert!(eval(&n, &[&x, &i64t(&[2], &[2, 2])]).is_err());
        assert!(eval(&n, &[&x, &i64t(&[1], &[-1])]).is_err());
        assert!(eval(&n, &[&x, &i64t(&[2], &[i64::MAX, 3])]).is_err());
        Ok(())
    }

    #[test]
    fn expand_infers_from_symbolic_shapes() -> Result<(), String> {
        let n = node("Expand", 2, &[]);
        let xt = sym_ty(DType::I64, vec![f(1), d("seq")]);
        let st = sym_ty(DType::I64, vec![f(2)]);
        let sv = [d("batch"), d("seq")];
        let out = infer(
            &n,
            &[
                InferInput { ty: Some(&xt), ..Default::default() },
                InferInput { ty: Some(&st), constant: None, sym: Some(&sv) },
            ],
        )?;
        assert_eq!(out.ty.shape, Some(vec![d("batch"), d("seq")]));
        let out = infer(
            &n,
            &[InferInput { ty: Some(&xt), ..Default::default() }, InferInput { ty: Some(&st), ..Default::default() }],
        )?;
        assert_eq!(out.ty.shape.map(|s| s.len()), Some(2));
        Ok(())
    }
}
