//! Gather along any axis; negative indices count from the end, out-of-range
//! ones are errors. Gathering constant indices from a shape value keeps its
//! symbolic contents (`Shape(x)[0]` = `batch`).

use crate::Tensor;
use crate::graph::{Dim, Node, ValueType};
use crate::ops::util::{input, input_type, ints, norm_axis};
use crate::ops::{InferInput, Inferred, OpDef};

use super::{checked_numel, int_dims, is_int, known_ints, take};

pub struct Gather;

/// `i` in `-n..n` → `0..n`.
fn norm_index(i: i64, n: usize) -> Result<usize, String> {
    let m = n as i64;
    let j = if i < 0 { i + m } else { i };
    if (0..m).contains(&j) { Ok(j as usize) } else { Err(format!("index {i} out of range for a dimension of {n}")) }
}

impl OpDef for Gather {
    fn name(&self) -> &'static str {
        "Gather"
    }

    fn check(&self, node: &Node) -> Result<(), String> {
        node.attrs.int("axis", 0).map(drop)
    }

    fn infer(&self, node: &Node, inputs: &[InferInput<'_>]) -> Result<Vec<Inferred>, String> {
        let x = input_type(inputs, 0)?;
        let it = input_type(inputs, 1)?;
        if !is_int(it.dtype) {
            return Err(format!("indices must be INT64 or INT32, got {}", it.dtype));
        }
        let (Some(xs), Some(is)) = (&x.shape, &it.shape) else {
            return Ok(vec![Inferred::new(ValueType { dtype: x.dtype, shape: None })]);
        };
        let axis = norm_axis(node.attrs.int("axis", 0)?, xs.len())?;
        let shape: Vec<Dim> = xs[..axis].iter().chain(is).chain(&xs[axis + 1..]).cloned().collect();
        let mut sym = None;
        if let (true, 1, Some(data), Some(idx)) =
            (is_int(x.dtype), xs.len(), int_dims(inputs.first()), known_ints(inputs.get(1)))
        {
            let picked = idx.iter().map(|&i| norm_index(i, data.len()).map(|j| data[j].clone()));
            sym = Some(picked.collect::<Result<Vec<Dim>, String>>()?);
        }
        // Indices of unknown contents leave nothing to check; known ones must fit.
        if let (Some(idx), Some(n)) = (known_ints(inputs.get(1)), xs[axis].as_fixed()) {
            for &i in &idx {
                norm_index(i, usize::try_from(n).unwrap_or(0))?;
            }
        }
        Ok(vec![Inferred { ty: ValueType::new(x.dtype, shape), sym }])
    }

    fn eval(&self, node: &Node, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, String> {
        let x = input(inputs, 0)?;
        let indices = input(inputs, 1)?;
        let axis = norm_axis(node.attrs.int("axis", 0)?, x.shape().len())?;
        let n = x.shape()[axis];
        let idx: Vec<usize> = ints(indices)?.iter().map(|&i| norm_index(i, n)).collect::<Result<_, _>>()?;
        let outer: usize = x.shape()[..axis].iter().product();
        let inner: usize = x.shape()[axis + 1..].iter().product();
        let shape: Vec<usize> =
            x.shape()[..axis].iter().chain(indices.shape()).chain(&x.shape()[axis + 1..]).copied().collect();
        let mut flat = Vec::with_capacity(checked_numel(&shape)?);
        for o in 0..outer {
            for &j in &idx {
                let base = (o * n + j) * inner;
                flat.extend(base..base + inner);
            }
        }
        Ok(vec![take(x, shape, &flat)?])
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
    fn gather_rows_columns_and_negative_indices() -> Result<(), String> {
        let x = f32t(&[3, 2], &[1., 2., 3., 4., 5., 6.]);
        let y = eval(&node("Gather", 2, &[]), &[&x, &i64t(&[2, 2], &[0, 1, -1, 0])])?;
        assert_eq!(y.shape(), &[2, 2, 2]);
        assert_eq!(f32s(&y)?, &[1., 2., 3., 4., 5., 6., 1., 2.]);
        let cols = node("Gather", 2, &[("axis", Attr::Int(-1))]);
        let y = eval(&cols, &[&x, &i64t(&[], &[1])])?;
        assert_eq!(y.shape(), &[3]);
        assert_eq!(f32s(&y)?, &[2., 4., 6.]);
        // An embedding lookup with INT32 indices on INT64 data.
        let table = i64t(&[2, 3], &[1, 2, 3, 4, 5, 6]);
        let i32s = crate::Tensor::new(vec![1, 2], crate::TensorData::I32(vec![1, 1])).map_err(|e| e.to_string())?;
        let y = eval(&node("Gather", 2, &[]), &[&table, &i32s])?;
        assert_eq!(y.shape(), &[1, 2, 3]);
        assert_eq!(i64s(&y)?, &[4, 5, 6, 4, 5, 6]);
        Ok(())
    }

    #[test]
    fn gather_out_of_range_is_an_error() {
        let x = f32t(&[3, 2], &[0.; 6]);
        let n = node("Gather", 2, &[]);
        assert!(eval(&n, &[&x, &i64t(&[1], &[3])]).is_err());
        assert!(eval(&n, &[&x, &i64t(&[1], &[-4])]).is_err());
        assert!(eval(&node("Gather", 2, &[("axis", Attr::Int(2))]), &[&x, &i64t(&[1], &[0])]).is_err());
        assert!(eval(&n, &[&x, &f32t(&[1], &[0.])]).is_err());
    }

    #[test]
    fn gather_propagates_sym_and_shapes() -> Result<(), String> {
        let n = node("Gather", 2, &[]);
        let st = sym_ty(DType::I64, vec![f(3)]);
        let sym = [d("batch"), d("seq"), f(384)];
        let s = InferInput { ty: Some(&st), constant: None, sym: Some(&sym) };
        let i = i64t(&[], &[-2]);
        let it = vt(&i);
        let out = infer(&n, &[s, konst(&i, &it)])?;
        assert_eq!(out.ty.shape, Some(vec![]));
        assert_eq!(out.sym, Some(vec![d("seq")]));
        let i = i64t(&[2], &[2, 0]);
        let it = vt(&i);
        assert_eq!(infer(&n, &[s, konst(&i, &it)])?.sym, Some(vec![f(384), d("batch")]));
        let i = i64t(&[], &[3]);
        let it = vt(&i);
        assert!(infer(&n, &[s, konst(&i, &it)]).is_err());
        // Embedding: [vocab, 384] gathered by [batch, seq] ids.
        let wt = sym_ty(DType::F32, vec![f(30522), f(384)]);
        let idt = sym_ty(DType::I64, vec![d("batch"), d("seq")]);
        let out = infer(
            &n,
            &[InferInput { ty: Some(&wt), ..Default::default() }, InferInput { ty: Some(&idt), ..Default::default() }],
        )?;
        assert_eq!(out.ty.shape, Some(vec![d("batch"), d("seq"), f(384)]));
        assert_eq!(out.sym, None);
        Ok(())
    }
}
