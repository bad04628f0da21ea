//! ConstantOfShape: a tensor of the given (possibly symbolic) shape filled
//! with the one-element `value` attribute (default FP32 zero).

use crate::graph::{Dim, Node, ValueType};
use crate::ops::util::{input, ints};
use crate::ops::{InferInput, Inferred, OpDef};
use crate::{DType, Tensor, TensorData};

use super::{MAX_SYM_LEN, checked_numel, fresh, int_dims, is_int, vec_len};

pub struct ConstantOfShape;

fn value(node: &Node) -> Result<Tensor, String> {
    match node.attrs.tensor("value")? {
        None => Tensor::zeros(DType::F32, vec![]).map_err(|e| e.to_string()),
        Some(t) if t.data().len() == 1 && t.dtype() != DType::Bytes => Ok(t.clone()),
        Some(t) => Err(format!("value must hold one number, got {} {:?}", t.dtype(), t.shape())),
    }
}

/// `n` copies of the single element of `v` (checked by [`value`]).
fn fill<T: Clone>(v: &[T], n: usize) -> Vec<T> {
    v.first().map(|x| vec![x.clone(); n]).unwrap_or_default()
}

impl OpDef for ConstantOfShape {
    fn name(&self) -> &'static str {
        "ConstantOfShape"
    }

    fn check(&self, node: &Node) -> Result<(), String> {
        value(node).map(drop)
    }

    fn infer(&self, node: &Node, inputs: &[InferInput<'_>]) -> Result<Vec<Inferred>, String> {
        let v = value(node)?;
        let shape: Option<Vec<Dim>> = match int_dims(inputs.first()) {
            Some(s) => {
                if let Some(n) = s.iter().filter_map(Dim::as_fixed).find(|&n| n < 0) {
                    return Err(format!("negative dimension {n}"));
                }
                Some(s)
            }
            None => vec_len(inputs.first()).map(|n| (0..n).map(|i| fresh(node, i)).collect()),
        };
        // A small integer fill is a shape value too (exporters build -1 masks this way).
        let sym = match (&shape, ints(&v)) {
            (Some(s), Ok(fill)) if is_int(v.dtype()) && s.len() <= 1 => {
                let n = s.first().map_or(Some(1), Dim::as_fixed).and_then(|n| usize::try_from(n).ok());
                n.filter(|&n| n <= MAX_SYM_LEN).map(|n| vec![Dim::fixed(fill[0]); n])
            }
            _ => None,
        };
        Ok(vec![Inferred { ty: ValueType { dtype: v.dtype(), shape }, sym }])
    }

    fn eval(&self, node: &Node, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, String> {
        let dims: Vec<usize> = ints(input(inputs, 0)?)?
            .into_iter()
            .map(|d| usize::try_from(d).map_err(|_| format!("negative dimension {d}")))
            .collect::<Result<_, _>>()?;
        let n = checked_numel(&dims)?;
        let data = match value(node)?.into_data() {
            TensorData::Bool(v) => TensorData::Bool(fill(&v, n)),
            TensorData::U8(v) => TensorData::U8(fill(&v, n)),
            TensorData::I8(v) => TensorData::I8(fill(&v, n)),
            TensorData::I16(v) => TensorData::I16(fill(&v, n)),
            TensorData::I32(v) => TensorData::I32(fill(&v, n)),
            TensorData::I64(v) => TensorData::I64(fill(&v, n)),
            TensorData::F16(v) => TensorData::F16(fill(&v, n)),
            TensorData::F32(v) => TensorData::F32(fill(&v, n)),
            TensorData::F64(v) => TensorData::F64(fill(&v, n)),
            TensorData::Bytes(_) => return Err("value must hold one number".into()),
        };
        Ok(vec![Tensor::new(dims, data).map_err(|e| e.to_string())?])
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::*;
    use crate::graph::Attr;
    use crate::ops::InferInput;
    use crate::ops::util::{f32s, i64s};
    use crate::{DType, TensorData};

    #[test]
    fn constant_of_shape_fills_with_value_or_zero() -> Result<(), String> {
        let y = eval(&node("ConstantOfShape", 1, &[]), &[&i64t(&[2], &[2, 3])])?;
        assert_eq!(y.shape(), &[2, 3]);
        assert_eq!(f32s(&y)?, &[0.; 6]);
        let ones = node("ConstantOfShape", 1, &[("value", Attr::Tensor(i64t(&[1], &[-1])))]);
        let y = eval(&ones, &[&i64t(&[1], &[3])])?;
        assert_eq!(i64s(&y)?, &[-1, -1, -1]);
        let y = eval(&ones, &[&i64t(&[0], &[])])?;
        assert_eq!(y.shape(), &[] as &[usize]);
        let b = node("ConstantOfShape", 1, &[("value", Attr::Tensor(boolt(&[1], &[true])))]);
        assert_eq!(eval(&b, &[&i64t(&[1], &[2])])?.data(), &TensorData::Bool(vec![true, true]));
        assert!(eval(&ones, &[&i64t(&[1], &[-3])]).is_err());
        assert!(eval(&ones, &[&i64t(&[2], &[i64::MAX, 4])]).is_err());
        let two = node("ConstantOfShape", 1, &[("value", Attr::Tensor(f32t(&[2], &[1., 2.])))]);
        assert!(crate::ops::registry().get("ConstantOfShape").is_some_and(|op| op.check(&two).is_err()));
        Ok(())
    }

    #[test]
    fn constant_of_shape_infers_symbolic_shape_and_small_sym() -> Result<(), String> {
        let n = node("ConstantOfShape", 1, &[]);
        let st = sym_ty(DType::I64, vec![f(2)]);
        let sv = [d("batch"), d("seq")];
        let out = infer(&n, &[InferInput { ty: Some(&st), constant: None, sym: Some(&sv) }])?;
        assert_eq!(out.ty, sym_ty(DType::F32, vec![d("batch"), d("seq")]));
        assert_eq!(out.sym, None);
        let ones = node("ConstantOfShape", 1, &[("value", Attr::Tensor(i64t(&[1], &[1])))]);
        let k = i64t(&[1], &[3]);
        let kt = vt(&k);
        let out = infer(&ones, &[konst(&k, &kt)])?;
        assert_eq!(out.ty, sym_ty(DType::I64, vec![f(3)]));
        assert_eq!(out.sym, Some(vec![f(1); 3]));
        Ok(())
    }
}
