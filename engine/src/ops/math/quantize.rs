//! QuantizeLinear and DequantizeLinear (ONNX opset 10–21, INT8 and UINT8): what explicit
//! (Q/DQ) quantised models carry. Scales are per tensor, or per axis with `axis`; the
//! zero point's type (UINT8 when absent) is the quantised type. Q rounds half to even and
//! saturates, as ONNX specifies.

use crate::graph::Node;
use crate::ops::util::{f32s, input, input_type, norm_axis};
use crate::ops::{InferInput, Inferred, OpDef};
use crate::{DType, Tensor, TensorData};

#[derive(Debug)]
pub(super) struct QuantizeLinear;

#[derive(Debug)]
pub(super) struct DequantizeLinear;

/// The scale (and zero point) of element `i` of a tensor of `shape`: one per tensor, or
/// one per index along `axis`.
struct Params {
    scales: Vec<f32>,
    zeros: Vec<i32>,
    /// Elements per index of the axis (the product of the dims after it).
    inner: usize,
}

impl Params {
    fn new(node: &Node, shape: &[usize], scale: &Tensor, zero: Option<&Tensor>) -> Result<Self, String> {
        let scales = f32s(scale)?.to_vec();
        let zeros: Vec<i32> = match zero.map(Tensor::data) {
            None => vec![0; scales.len()],
            Some(TensorData::I8(z)) => z.iter().map(|&v| i32::from(v)).collect(),
            Some(TensorData::U8(z)) => z.iter().map(|&v| i32::from(v)).collect(),
            Some(_) => return Err("zero point must be INT8 or UINT8".into()),
        };
        if zeros.len() != scales.len() || scales.is_empty() {
            return Err(format!("{} scales but {} zero points", scales.len(), zeros.len()));
        }
        if scales.iter().any(|s| !s.is_finite() || *s == 0.0) {
            return Err("scales must be finite and non-zero".into());
        }
        let inner = if scales.len() == 1 {
            usize::MAX
        } else {
            let axis = norm_axis(node.attrs.int("axis", 1)?, shape.len())?;
            if shape[axis] != scales.len() {
                return Err(format!("{} scales for axis {axis} of shape {shape:?}", scales.len()));
            }
            shape[axis + 1..].iter().product::<usize>().max(1)
        };
        Ok(Self { scales, zeros, inner })
    }

    fn at(&self, i: usize) -> (f32, i32) {
        if self.inner == usize::MAX {
            return (self.scales[0], self.zeros[0]);
        }
        let k = (i / self.inner) % self.scales.len();
        (self.scales[k], self.zeros[k])
    }
}

/// The quantised element type: the zero point's, UINT8 without one.
fn quantised_type(inputs: &[InferInput<'_>]) -> Result<DType, String> {
    match inputs.get(2).and_then(|i| i.ty) {
        None => Ok(DType::U8),
        Some(t) if matches!(t.dtype, DType::I8 | DType::U8) => Ok(t.dtype),
        Some(t) => Err(format!("zero point of type {} is not supported (INT8 or UINT8)", t.dtype)),
    }
}

fn check_io(node: &Node, name: &str) -> Result<(), String> {
    if node.input(0).is_none() || node.input(1).is_none() || node.inputs.len() > 3 || node.outputs.len() != 1 {
        return Err(format!("{name} takes an input, a scale and an optional zero point, and has one output"));
    }
    // `saturate` concerns FP8 only; INT8 and UINT8 always saturate.
    node.attrs.int("saturate", 1)?;
    if node.attrs.int("block_size", 0)? != 0 {
        return Err("blocked quantisation (block_size) is not supported".into());
    }
    if node.attrs.get("output_dtype").is_some() {
        return Err("output_dtype is not supported: give the quantised type by the zero point".into());
    }
    node.attrs.int("axis", 1)?;
    Ok(())
}

impl OpDef for QuantizeLinear {
    fn name(&self) -> &'static str {
        "QuantizeLinear"
    }

    fn check(&self, node: &Node) -> Result<(), String> {
        check_io(node, self.name())
    }

    fn infer(&self, _node: &Node, inputs: &[InferInput<'_>]) -> Result<Vec<Inferred>, String> {
        let x = input_type(inputs, 0)?;
        if x.dtype != DType::F32 {
            return Err(format!("QuantizeLinear of {} is not supported", x.dtype));
        }
        let mut t = x.clone();
        t.dtype = quantised_type(inputs)?;
        Ok(vec![Inferred::new(t)])
    }

    fn eval(&self, node: &Node, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, String> {
        let x = input(inputs, 0)?;
        let zero = inputs.get(2).copied().flatten();
        let p = Params::new(node, x.shape(), input(inputs, 1)?, zero)?;
        let q = f32s(x)?.iter().enumerate().map(|(i, &v)| {
            let (s, z) = p.at(i);
            let r = (v / s).round_ties_even();
            if r.is_nan() { z as f32 } else { r + z as f32 }
        });
        let data = match zero.map(Tensor::dtype) {
            Some(DType::I8) => TensorData::I8(q.map(|v| v.clamp(-128.0, 127.0) as i8).collect()),
            _ => TensorData::U8(q.map(|v| v.clamp(0.0, 255.0) as u8).collect()),
        };
        Ok(vec![Tensor::new(x.shape().to_vec(), data).map_err(|e| e.to_string())?])
    }
}

impl OpDef for DequantizeLinear {
    fn name(&self) -> &'static str {
        "DequantizeLinear"
    }

    fn check(&self, node: &Node) -> Result<(), String> {
        check_io(node, self.name())
    }

    fn infer(&self, _node: &Node, inputs: &[InferInput<'_>]) -> Result<Vec<Inferred>, String> {
        let x = input_type(inputs, 0)?;
        if !matches!(x.dtype, DType::I8 | DType::U8 | DType::I32) {
            return Err(format!("DequantizeLinear of {} is not supported", x.dtype));
        }
        let mut t = x.clone();
        t.dtype = DType::F32;
        Ok(vec![Inferred::new(t)])
    }

    fn eval(&self, node: &Node, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, String> {
        let x = input(inputs, 0)?;
        let p = Params::new(node, x.shape(), input(inputs, 1)?, inputs.get(2).copied().flatten())?;
        let values: Vec<i32> = match x.data() {
            TensorData::I8(v) => v.iter().map(|&q| i32::from(q)).collect(),
            TensorData::U8(v) => v.iter().map(|&q| i32::from(q)).collect(),
            TensorData::I32(v) => v.clone(),
            _ => return Err(format!("DequantizeLinear of {} is not supported", x.dtype())),
        };
        let data = values
            .iter()
            .enumerate()
            .map(|(i, &q)| {
                let (s, z) = p.at(i);
                (q - z) as f32 * s
            })
            .collect();
        Ok(vec![Tensor::new(x.shape().to_vec(), TensorData::F32(data)).map_err(|e| e.to_string())?])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::Attr;

    fn node(op: &str, axis: Option<i64>) -> Node {
        let n = Node::new("q", op, vec![Some(0), Some(1), Some(2)], vec![3]);
        match axis {
            Some(a) => n.with_attr("axis", Attr::Int(a)),
            None => n,
        }
    }

    #[test]
    fn quantize_and_dequantize_per_tensor_and_per_axis() -> Result<(), String> {
        let x = Tensor::new(vec![2, 3], TensorData::F32(vec![0.25, -0.25, 1.0, 300.0, -7.5, 0.75]))
            .map_err(|e| e.to_string())?;
        let s = Tensor::new(vec![], TensorData::F32(vec![0.5])).map_err(|e| e.to_string())?;
        let z = Tensor::new(vec![], TensorData::I8(vec![0])).map_err(|e| e.to_string())?;
        let q = QuantizeLinear.eval(&node("QuantizeLinear", None), &[Some(&x), Some(&s), Some(&z)])?;
        // 0.5 → 0 and -0.5 → -0 (ties to even), 2, saturated 127, -15, 1.5 → 2.
        assert_eq!(q[0].data(), &TensorData::I8(vec![0, 0, 2, 127, -15, 2]));
        let d = DequantizeLinear.eval(&node("DequantizeLinear", None), &[Some(&q[0]), Some(&s), Some(&z)])?;
        assert_eq!(d[0].as_f32(), Some(&[0.0, 0.0, 1.0, 63.5, -7.5, 1.0][..]));
        // UINT8 with a zero point of 128; per-axis scales along axis 0.
        let s2 = Tensor::new(vec![2], TensorData::F32(vec![1.0, 0.25])).map_err(|e| e.to_string())?;
        let z2 = Tensor::new(vec![2], TensorData::U8(vec![128, 128])).map_err(|e| e.to_string())?;
        let q = QuantizeLinear.eval(&node("QuantizeLinear", Some(0)), &[Some(&x), Some(&s2), Some(&z2)])?;
        assert_eq!(q[0].data(), &TensorData::U8(vec![128, 128, 129, 255, 98, 131]));
        let d = DequantizeLinear.eval(&node("DequantizeLinear", Some(0)), &[Some(&q[0]), Some(&s2), Some(&z2)])?;
        assert_eq!(d[0].as_f32(), Some(&[0.0, 0.0, 1.0, 31.75, -7.5, 0.75][..]));
        assert!(QuantizeLinear.eval(&node("QuantizeLinear", Some(1)), &[Some(&x), Some(&s2), Some(&z2)]).is_err());
        Ok(())
    }
}
