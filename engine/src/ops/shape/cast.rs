//! Cast. Every float target is FP32 in kiln's IR: FLOAT16 rounds the values
//! to half precision (what the exported model computes with) but keeps FP32
//! storage. Float → int truncates toward zero (saturating); int → narrower
//! int wraps, as C and ONNX Runtime do.

use kiln_onnx::DataType;

use crate::graph::{Node, ValueType};
use crate::ops::util::{input, input_type};
use crate::ops::{InferInput, Inferred, OpDef};
use crate::{DType, Tensor, TensorData, f16};

use super::{int_dims, is_int};

pub struct Cast;

/// What a cast produces: a dtype, and for FLOAT16 the rounding.
fn target(node: &Node) -> Result<(DType, bool), String> {
    let to = node.attrs.int("to", -1)?;
    let dt = i32::try_from(to).ok().and_then(|t| DataType::try_from(t).ok());
    Ok(match dt {
        Some(DataType::Float | DataType::Double) => (DType::F32, false),
        Some(DataType::Float16) => (DType::F32, true),
        Some(DataType::Int64) => (DType::I64, false),
        Some(DataType::Int32) => (DType::I32, false),
        Some(DataType::Bool) => (DType::Bool, false),
        Some(DataType::Uint8) => (DType::U8, false),
        Some(DataType::Int8) => (DType::I8, false),
        _ if to == -1 => return Err("attribute to is required".into()),
        other => {
            return Err(format!("cast to {} is not supported", other.map_or(to.to_string(), |d| format!("{d:?}"))));
        }
    })
}

/// Source values, floats or integers, before conversion.
enum Column {
    Floats(Vec<f64>),
    Ints(Vec<i64>),
}

fn column(data: &TensorData) -> Result<Column, String> {
    let ints = |v: Vec<i64>| Ok(Column::Ints(v));
    match data {
        TensorData::Bool(v) => ints(v.iter().map(|&b| i64::from(b)).collect()),
        TensorData::U8(v) => ints(v.iter().map(|&x| i64::from(x)).collect()),
        TensorData::I8(v) => ints(v.iter().map(|&x| i64::from(x)).collect()),
        TensorData::I16(v) => ints(v.iter().map(|&x| i64::from(x)).collect()),
        TensorData::I32(v) => ints(v.iter().map(|&x| i64::from(x)).collect()),
        TensorData::I64(v) => ints(v.clone()),
        TensorData::F16(v) => Ok(Column::Floats(v.iter().map(|&x| f64::from(x.to_f32())).collect())),
        TensorData::F32(v) => Ok(Column::Floats(v.iter().map(|&x| f64::from(x)).collect())),
        TensorData::F64(v) => Ok(Column::Floats(v.clone())),
        TensorData::Bytes(_) => Err("cannot cast strings".into()),
    }
}

fn convert(col: Column, dtype: DType, round16: bool) -> Result<TensorData, String> {
    // Integers through an i64, which `as` truncates (floats) or wraps (ints).
    let as_ints = |col: &Column| -> Vec<i64> {
        match col {
            Column::Floats(v) => v.iter().map(|&x| x as i64).collect(),
            Column::Ints(v) => v.clone(),
        }
    };
    Ok(match dtype {
        DType::F32 => {
            let v: Vec<f32> = match &col {
                Column::Floats(v) => v.iter().map(|&x| x as f32).collect(),
                Column::Ints(v) => v.iter().map(|&x| x as f32).collect(),
            };
            TensorData::F32(if round16 { v.into_iter().map(|x| f16::from_f32(x).to_f32()).collect() } else { v })
        }
        DType::Bool => TensorData::Bool(match &col {
            Column::Floats(v) => v.iter().map(|&x| x != 0.0).collect(),
            Column::Ints(v) => v.iter().map(|&x| x != 0).collect(),
        }),
        DType::I64 => TensorData::I64(as_ints(&col)),
        DType::I32 => TensorData::I32(as_ints(&col).into_iter().map(|x| x as i32).collect()),
        DType::U8 => TensorData::U8(as_ints(&col).into_iter().map(|x| x as u8).collect()),
        DType::I8 => TensorData::I8(as_ints(&col).into_iter().map(|x| x as i8).collect()),
        other => return Err(format!("cast to {other} is not supported")),
    })
}

impl OpDef for Cast {
    fn name(&self) -> &'static str {
        "Cast"
    }

    fn check(&self, node: &Node) -> Result<(), String> {
        target(node).map(drop)
    }

    fn infer(&self, node: &Node, inputs: &[InferInput<'_>]) -> Result<Vec<Inferred>, String> {
        let x = input_type(inputs, 0)?;
        let (dtype, _) = target(node)?;
        let sym = if is_int(x.dtype) && is_int(dtype) { int_dims(inputs.first()) } else { None };
        Ok(vec![Inferred { ty: ValueType { dtype, shape: x.shape.clone() }, sym }])
    }

    fn eval(&self, node: &Node, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, String> {
        let x = input(inputs, 0)?;
        let (dtype, round16) = target(node)?;
        let data = convert(column(x.data())?, dtype, round16)?;
        Ok(vec![Tensor::new(x.shape().to_vec(), data).map_err(|e| e.to_string())?])
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::*;
    use crate::graph::Attr;
    use crate::ops::InferInput;
    use crate::ops::util::{f32s, i64s};
    use crate::{DType, TensorData};

    fn cast(to: i64) -> crate::graph::Node {
        node("Cast", 1, &[("to", Attr::Int(to))])
    }

    #[test]
    fn cast_between_floats_ints_and_bools() -> Result<(), String> {
        let x = f32t(&[5], &[1.7, -1.7, 0.0, 300.0, -129.0]);
        assert_eq!(i64s(&eval(&cast(7), &[&x])?)?, &[1, -1, 0, 300, -129]);
        assert_eq!(eval(&cast(9), &[&x])?.data(), &TensorData::Bool(vec![true, true, false, true, true]));
        assert_eq!(eval(&cast(6), &[&x])?.data(), &TensorData::I32(vec![1, -1, 0, 300, -129]));
        assert_eq!(eval(&cast(2), &[&x])?.data(), &TensorData::U8(vec![1, 255, 0, 44, 127]));
        assert_eq!(eval(&cast(3), &[&x])?.data(), &TensorData::I8(vec![1, -1, 0, 44, 127]));
        let b = boolt(&[2], &[true, false]);
        assert_eq!(f32s(&eval(&cast(1), &[&b])?)?, &[1.0, 0.0]);
        let big = i64t(&[1], &[i64::MAX]);
        assert_eq!(i64s(&eval(&cast(7), &[&big])?)?, &[i64::MAX]);
        // DOUBLE is FP32 in kiln; FLOAT16 rounds to half precision.
        let y = eval(&cast(11), &[&x])?;
        assert_eq!(y.dtype(), DType::F32);
        let fine = f32t(&[2], &[1.0001, 70000.0]);
        let y = eval(&cast(10), &[&fine])?;
        assert_eq!(y.dtype(), DType::F32);
        assert_eq!(f32s(&y)?, &[1.0, f32::INFINITY]);
        Ok(())
    }

    #[test]
    fn cast_rejects_unsupported_targets() {
        let op = crate::ops::registry().get("Cast");
        assert!(op.is_some_and(|op| op.check(&cast(8)).is_err())); // STRING
        assert!(op.is_some_and(|op| op.check(&node("Cast", 1, &[])).is_err()));
        assert!(op.is_some_and(|op| op.check(&cast(7)).is_ok()));
        assert!(eval(&cast(4), &[&f32t(&[1], &[1.])]).is_err()); // UINT16
    }

    #[test]
    fn cast_infers_dtype_and_keeps_integer_sym() -> Result<(), String> {
        let st = sym_ty(DType::I64, vec![f(2)]);
        let sv = [d("batch"), f(4)];
        let s = InferInput { ty: Some(&st), constant: None, sym: Some(&sv) };
        let out = infer(&cast(6), &[s])?;
        assert_eq!(out.ty, sym_ty(DType::I32, vec![f(2)]));
        assert_eq!(out.sym, Some(sv.to_vec()));
        let out = infer(&cast(1), &[s])?;
        assert_eq!(out.ty.dtype, DType::F32);
        assert_eq!(out.sym, None);
        Ok(())
    }
}
