//! Transpose: `perm` (default: reverse the axes).

use crate::Tensor;
use crate::graph::{Node, ValueType};
use crate::ops::util::{input, input_type};
use crate::ops::{InferInput, Inferred, OpDef};

use super::{row_strides, strided_indices, take};

pub struct Transpose;

/// The permutation for a rank-`rank` input, checked to be one.
fn perm(node: &Node, rank: usize) -> Result<Vec<usize>, String> {
    let Some(p) = node.attrs.ints("perm")? else {
        return Ok((0..rank).rev().collect());
    };
    if p.len() != rank {
        return Err(format!("perm {p:?} does not match rank {rank}"));
    }
    let mut seen = vec![false; rank];
    let mut out = Vec::with_capacity(rank);
    for &a in p {
        match usize::try_from(a).ok().filter(|&a| a < rank && !seen[a]) {
            Some(a) => {
                seen[a] = true;
                out.push(a);
            }
            None => return Err(format!("perm {p:?} is not a permutation of 0..{rank}")),
        }
    }
    Ok(out)
}

impl OpDef for Transpose {
    fn name(&self) -> &'static str {
        "Transpose"
    }

    fn check(&self, node: &Node) -> Result<(), String> {
        if let Some(p) = node.attrs.ints("perm")? {
            perm(node, p.len())?;
        }
        Ok(())
    }

    fn infer(&self, node: &Node, inputs: &[InferInput<'_>]) -> Result<Vec<Inferred>, String> {
        let x = input_type(inputs, 0)?;
        let shape = match &x.shape {
            Some(s) => Some(perm(node, s.len())?.iter().map(|&a| s[a].clone()).collect()),
            None => node.attrs.ints("perm")?.map(|p| (0..p.len()).map(|i| super::fresh(node, i)).collect()),
        };
        Ok(vec![Inferred::new(ValueType { dtype: x.dtype, shape })])
    }

    fn eval(&self, node: &Node, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, String> {
        let x = input(inputs, 0)?;
        let p = perm(node, x.shape().len())?;
        let strides = row_strides(x.shape());
        let out: Vec<usize> = p.iter().map(|&a| x.shape()[a]).collect();
        let view: Vec<i64> = p.iter().map(|&a| strides[a] as i64).collect();
        let idx = strided_indices(&out, &view, 0)?;
        Ok(vec![take(x, out, &idx)?])
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::*;
    use crate::DType;
    use crate::graph::Attr;
    use crate::ops::InferInput;
    use crate::ops::util::{f32s, i64s};

    #[test]
    fn transpose_permutes_and_defaults_to_reverse() -> Result<(), String> {
        let x = f32t(&[2, 3], &[1., 2., 3., 4., 5., 6.]);
        let y = eval(&node("Transpose", 1, &[]), &[&x])?;
        assert_eq!(y.shape(), &[3, 2]);
        assert_eq!(f32s(&y)?, &[1., 4., 2., 5., 3., 6.]);
        let x = i64t(&[2, 3, 4], &(0..24).collect::<Vec<_>>());
        let n = node("Transpose", 1, &[("perm", Attr::Ints(vec![1, 2, 0]))]);
        let y = eval(&n, &[&x])?;
        assert_eq!(y.shape(), &[3, 4, 2]);
        // y[i][j][k] = x[k][i][j]
        assert_eq!(i64s(&y)?[..4], [0, 12, 1, 13]);
        assert_eq!(i64s(&y)?[2 * 8 + 3 * 2 + 1], 12 + 2 * 4 + 3);
        Ok(())
    }

    #[test]
    fn transpose_rejects_bad_perms_and_infers() -> Result<(), String> {
        let x = f32t(&[2, 3], &[0.; 6]);
        for p in [vec![0, 0], vec![0, 2], vec![1, 0, 2], vec![-1, 0]] {
            assert!(eval(&node("Transpose", 1, &[("perm", Attr::Ints(p))]), &[&x]).is_err());
        }
        let n = node("Transpose", 1, &[("perm", Attr::Ints(vec![0, 2, 1, 3]))]);
        let xt = sym_ty(DType::F32, vec![d("batch"), d("seq"), f(12), f(32)]);
        let out = infer(&n, &[InferInput { ty: Some(&xt), ..Default::default() }])?;
        assert_eq!(out.ty.shape, Some(vec![d("batch"), f(12), d("seq"), f(32)]));
        Ok(())
    }
}
