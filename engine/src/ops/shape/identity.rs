//! Identity: passes its input (and any symbolic contents) through.

use crate::Tensor;
use crate::graph::Node;
use crate::ops::util::{input, input_type};
use crate::ops::{InferInput, Inferred, OpDef};

pub struct Identity;

impl OpDef for Identity {
    fn name(&self) -> &'static str {
        "Identity"
    }

    fn infer(&self, _node: &Node, inputs: &[InferInput<'_>]) -> Result<Vec<Inferred>, String> {
        let x = input_type(inputs, 0)?;
        let sym = if super::is_int(x.dtype) { super::int_dims(inputs.first()) } else { None };
        Ok(vec![Inferred { ty: x.clone(), sym }])
    }

    fn eval(&self, _node: &Node, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, String> {
        Ok(vec![input(inputs, 0)?.clone()])
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::*;
    use crate::DType;
    use crate::ops::InferInput;

    #[test]
    fn identity_copies_value_type_and_sym() -> Result<(), String> {
        let n = node("Identity", 1, &[]);
        let x = i64t(&[2], &[3, 4]);
        assert_eq!(eval(&n, &[&x])?, x);
        let st = sym_ty(DType::I64, vec![f(1)]);
        let sv = [d("seq")];
        let out = infer(&n, &[InferInput { ty: Some(&st), constant: None, sym: Some(&sv) }])?;
        assert_eq!(out.ty, st);
        assert_eq!(out.sym, Some(vec![d("seq")]));
        assert!(eval(&n, &[]).is_err());
        Ok(())
    }
}
