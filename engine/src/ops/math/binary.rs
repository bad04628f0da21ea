//! Add, Sub, Mul, Div and Pow with multidirectional broadcasting. Integer
//! variants exist for shape arithmetic, and propagate symbolic contents so that
//! shape subgraphs like `Shape(x)[0] * 12` stay foldable.

use crate::graph::{Dim, Node, ValueType, numel};
use crate::ops::util::{broadcast_dims, broadcast_shapes, broadcast_strides, input, input_type, ints};
use crate::ops::{InferInput, Inferred, OpDef, Registry};
use crate::{DType, Tensor, TensorData};

use super::{checked_numel, for_each_run};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Add,
    Sub,
    Mul,
    Div,
    Pow,
}

#[derive(Debug)]
pub(super) struct Binary(Kind);

pub(super) fn register(r: &mut Registry) {
    for k in [Kind::Add, Kind::Sub, Kind::Mul, Kind::Div, Kind::Pow] {
        r.add(Binary(k));
    }
}

impl OpDef for Binary {
    fn name(&self) -> &'static str {
        match self.0 {
            Kind::Add => "Add",
            Kind::Sub => "Sub",
            Kind::Mul => "Mul",
            Kind::Div => "Div",
            Kind::Pow => "Pow",
        }
    }

    fn check(&self, node: &Node) -> Result<(), String> {
        if node.inputs.len() != 2 || node.input(0).is_none() || node.input(1).is_none() {
            return Err(format!("{} takes exactly two inputs", self.name()));
        }
        if node.outputs.len() != 1 {
            return Err(format!("{} has exactly one output", self.name()));
        }
        Ok(())
    }

    fn infer(&self, _node: &Node, inputs: &[InferInput<'_>]) -> Result<Vec<Inferred>, String> {
        let (ta, tb) = (input_type(inputs, 0)?, input_type(inputs, 1)?);
        if self.0 == Kind::Pow {
            if ta.dtype != DType::F32 {
                return Err(format!("Pow supports FP32 bases, got {}", ta.dtype));
            }
            if !matches!(tb.dtype, DType::F32 | DType::I64 | DType::I32) {
                return Err(format!("Pow exponent of type {} is not supported", tb.dtype));
            }
        } else {
            if ta.dtype != tb.dtype {
                return Err(format!("input types differ: {} and {}", ta.dtype, tb.dtype));
            }
            if !matches!(ta.dtype, DType::F32 | DType::I64 | DType::I32) {
                return Err(format!("{} of {} is not supported", self.name(), ta.dtype));
            }
        }
        let shape = match (&ta.shape, &tb.shape) {
            (Some(a), Some(b)) => Some(broadcast_shapes(a, b)?),
            _ => None,
        };
        let sym = if ta.dtype == DType::I64 && self.0 != Kind::Pow { self.sym(inputs, shape.as_deref()) } else { None };
        Ok(vec![Inferred { ty: ValueType { dtype: ta.dtype, shape }, sym }])
    }

    fn eval(&self, _node: &Node, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, String> {
        let (a, b) = (input(inputs, 0)?, input(inputs, 1)?);
        let (sa, sb) = (a.shape(), b.shape());
        let (shape, data) = match (self.0, a.data(), b.data()) {
            (Kind::Pow, TensorData::F32(x), TensorData::F32(y)) => {
                let (shape, v) = if y.len() == 1 && y[0] == 2.0 {
                    map2(x, sa, y, sb, |p, _| p * p)?
                } else {
                    map2(x, sa, y, sb, f32::powf)?
                };
                (shape, TensorData::F32(v))
            }
            (Kind::Pow, TensorData::F32(x), TensorData::I64(_) | TensorData::I32(_)) => {
                let y: Vec<f32> = ints(b)?.into_iter().map(|e| e as f32).collect();
                let (shape, v) = map2(x, sa, &y, sb, f32::powf)?;
                (shape, TensorData::F32(v))
            }
            (Kind::Pow, _, _) => return Err(format!("Pow of {} by {} is not supported", a.dtype(), b.dtype())),
            (k, TensorData::F32(x), TensorData::F32(y)) => {
                let (shape, v) = match k {
                    Kind::Add => map2(x, sa, y, sb, |p, q| p + q)?,
                    Kind::Sub => map2(x, sa, y, sb, |p, q| p - q)?,
                    Kind::Mul => map2(x, sa, y, sb, |p, q| p * q)?,
                    _ => map2(x, sa, y, sb, |p, q| p / q)?,
                };
                (shape, TensorData::F32(v))
            }
            (k, TensorData::I64(x), TensorData::I64(y)) => {
                let (shape, v) = int_op(k, x, sa, y, sb)?;
                (shape, TensorData::I64(v))
            }
            (k, TensorData::I32(x), TensorData::I32(y)) => {
                let (shape, v) = int_op(k, x, sa, y, sb)?;
                (shape, TensorData::I32(v))
            }
            _ => return Err(format!("{} of {} and {} is not supported", self.name(), a.dtype(), b.dtype())),
        };
        Ok(vec![Tensor::new(shape, data).map_err(|e| e.to_string())?])
    }
}

impl Binary {
    /// Symbolic contents of the result, when both operands' contents are known
    /// and every entry stays a monomial.
    fn sym(&self, inputs: &[InferInput<'_>], shape: Option<&[Dim]>) -> Option<Vec<Dim>> {
        let (a, b) = (known_ints(inputs.first()?)?, known_ints(inputs.get(1)?)?);
        let n = a.len().max(b.len());
        if (a.len() != n && a.len() != 1) || (b.len() != n && b.len() != 1) {
            return None;
        }
        if let Some(count) = shape.map(numel).and_then(|d| d.as_fixed())
            && count != n as i64
        {
            return None;
        }
        (0..n)
            .map(|i| {
                let (p, q) = (&a[i.min(a.len() - 1)], &b[i.min(b.len() - 1)]);
                match self.0 {
                    Kind::Mul => Some(p.mul(q)),
                    Kind::Div => p.div(q),
                    Kind::Add => Some(Dim::fixed(p.as_fixed()?.checked_add(q.as_fixed()?)?)),
                    Kind::Sub => Some(Dim::fixed(p.as_fixed()?.checked_sub(q.as_fixed()?)?)),
                    Kind::Pow => None,
                }
            })
            .collect()
    }
}

/// Longest integer tensor whose contents are tracked: shapes and their
/// pieces, not data such as position ids.
const MAX_SYM_LEN: usize = 64;

/// Contents of an integer input as dims: its `sym`, or its constant values.
fn known_ints(inp: &InferInput<'_>) -> Option<Vec<Dim>> {
    if let Some(s) = inp.sym {
        return (s.len() <= MAX_SYM_LEN).then(|| s.to_vec());
    }
    let c = inp.constant.filter(|c| c.data().len() <= MAX_SYM_LEN)?;
    Some(ints(c).ok()?.into_iter().map(Dim::fixed).collect())
}

fn int_op<T: IntLike>(k: Kind, x: &[T], sa: &[usize], y: &[T], sb: &[usize]) -> Result<(Vec<usize>, Vec<T>), String> {
    match k {
        Kind::Add => map2(x, sa, y, sb, T::wrapping_add),
        Kind::Sub => map2(x, sa, y, sb, T::wrapping_sub),
        Kind::Mul => map2(x, sa, y, sb, T::wrapping_mul),
        Kind::Div => {
            if y.iter().any(|v| v.is_zero()) {
                return Err("integer division by zero".into());
            }
            // Rust's `/` truncates toward zero, as ONNX (and C) integer Div does.
            map2(x, sa, y, sb, T::wrapping_div)
        }
        Kind::Pow => Err("integer Pow is not supported".into()),
    }
}

trait IntLike: Copy {
    fn wrapping_add(self, o: Self) -> Self;
    fn wrapping_sub(self, o: Self) -> Self;
    fn wrapping_mul(self, o: Self) -> Self;
    fn wrapping_div(self, o: Self) -> Self;
    fn is_zero(&self) -> bool;
}

macro_rules! int_like {
    ($t:ty) => {
        impl IntLike for $t {
            fn wrapping_add(self, o: Self) -> Self {
                <$t>::wrapping_add(self, o)
            }
            fn wrapping_sub(self, o: Self) -> Self {
                <$t>::wrapping_sub(self, o)
            }
            fn wrapping_mul(self, o: Self) -> Self {
                <$t>::wrapping_mul(self, o)
            }
            fn wrapping_div(self, o: Self) -> Self {
                <$t>::wrapping_div(self, o)
            }
            fn is_zero(&self) -> bool {
                *self == 0
            }
        }
    };
}
int_like!(i64);
int_like!(i32);

/// `f` over the broadcast of `x` (shape `sa`) and `y` (shape `sb`), in tight
/// contiguous runs: equal-shape, scalar, bias-like `[…, N] ⊕ [N]` and
/// row-broadcast `[…, N] ⊕ […, 1]` cases all become simple slice loops.
pub(super) fn map2<T: Copy, U>(
    x: &[T],
    sa: &[usize],
    y: &[T],
    sb: &[usize],
    f: impl Fn(T, T) -> U,
) -> Result<(Vec<usize>, Vec<U>), String> {
    if x.len() != checked_numel(sa)? || y.len() != checked_numel(sb)? {
        return Err("tensor data does not match its shape".into());
    }
    if sa == sb {
        return Ok((sa.to_vec(), x.iter().zip(y).map(|(&p, &q)| f(p, q)).collect()));
    }
    let out = broadcast_dims(sa, sb)?;
    let n = checked_numel(&out)?;
    let mut v = Vec::with_capacity(n);
    let (ta, tb) = (broadcast_strides(sa, &out), broadcast_strides(sb, &out));
    for_each_run(&out, &ta, &tb, |oa, ob, len, da, db| match (da, db) {
        (1, 1) => v.extend(x[oa..oa + len].iter().zip(&y[ob..ob + len]).map(|(&p, &q)| f(p, q))),
        (1, 0) => {
            let q = y[ob];
            v.extend(x[oa..oa + len].iter().map(|&p| f(p, q)));
        }
        (0, 1) => {
            let p = x[oa];
            v.extend(y[ob..ob + len].iter().map(|&q| f(p, q)));
        }
        _ => v.extend((0..len).map(|i| f(x[oa + i * da], y[ob + i * db]))),
    });
    Ok((out, v))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::fixed_shape;
    use crate::ops::util::{f32s, i64s, tensor_f32, tensor_i64};

    fn run(k: Kind, a: &Tensor, b: &Tensor) -> Result<Tensor, String> {
        let node = Node::new("n", Binary(k).name(), vec![Some(0), Some(1)], vec![2]);
        Binary(k).eval(&node, &[Some(a), Some(b)])?.pop().ok_or_else(|| "no output".to_string())
    }

    /// Naive broadcasting through explicit multi-indices.
    fn naive(a: &Tensor, b: &Tensor, f: impl Fn(f32, f32) -> f32) -> Result<Vec<f32>, String> {
        let out = broadcast_dims(a.shape(), b.shape())?;
        let (x, y) = (f32s(a)?, f32s(b)?);
        let at = |t: &[usize], idx: &[usize]| -> usize {
            let off = idx.len() - t.len();
            t.iter().enumerate().fold(0, |acc, (i, &d)| acc * d + if d == 1 { 0 } else { idx[off + i] })
        };
        let n: usize = out.iter().product();
        let mut res = Vec::with_capacity(n);
        for flat in 0..n {
            let mut idx = vec![0; out.len()];
            let mut r = flat;
            for d in (0..out.len()).rev() {
                idx[d] = r % out[d];
                r /= out[d];
            }
            res.push(f(x[at(a.shape(), &idx)], y[at(b.shape(), &idx)]));
        }
        Ok(res)
    }

    fn ramp(shape: &[usize], scale: f32) -> Result<Tensor, String> {
        let n = shape.iter().product::<usize>();
        tensor_f32(shape.to_vec(), (0..n).map(|i| (i as f32 + 1.0) * scale).collect())
    }

    #[test]
    fn float_ops_broadcast_like_numpy() -> Result<(), String> {
        let cases: [(&[usize], &[usize]); 7] = [
            (&[2, 3, 4], &[2, 3, 4]),
            (&[2, 3, 4], &[4]),
            (&[2, 3, 4], &[2, 3, 1]),
            (&[2, 1, 4], &[3, 1]),
            (&[1], &[2, 3]),
            (&[], &[3]),
            (&[2, 1, 3, 1], &[1, 4, 1, 5]),
        ];
        for (sa, sb) in cases {
            let (a, b) = (ramp(sa, 0.5)?, ramp(sb, 0.25)?);
            for (k, f) in [
                (Kind::Add, (|p, q| p + q) as fn(f32, f32) -> f32),
                (Kind::Sub, |p, q| p - q),
                (Kind::Mul, |p, q| p * q),
                (Kind::Div, |p, q| p / q),
                (Kind::Pow, f32::powf),
            ] {
                let got = run(k, &a, &b)?;
                assert_eq!(got.shape(), broadcast_dims(sa, sb)?.as_slice(), "{k:?} {sa:?} {sb:?}");
                assert_eq!(f32s(&got)?, naive(&a, &b, f)?.as_slice(), "{k:?} {sa:?} {sb:?}");
                let swapped = run(k, &b, &a)?;
                assert_eq!(f32s(&swapped)?, naive(&b, &a, f)?.as_slice(), "{k:?} {sb:?} {sa:?}");
            }
        }
        assert!(run(Kind::Add, &ramp(&[2, 3], 1.0)?, &ramp(&[4], 1.0)?).is_err());
        Ok(())
    }

    #[test]
    fn integer_division_truncates_and_rejects_zero() -> Result<(), String> {
        let a = tensor_i64(vec![4], vec![7, -7, 7, -7])?;
        let b = tensor_i64(vec![4], vec![2, 2, -2, -2])?;
        assert_eq!(i64s(&run(Kind::Div, &a, &b)?)?, &[3, -3, -3, 3]);
        let c = tensor_i64(vec![], vec![3])?;
        assert_eq!(i64s(&run(Kind::Mul, &a, &c)?)?, &[21, -21, 21, -21]);
        assert_eq!(i64s(&run(Kind::Sub, &c, &a)?)?, &[-4, 10, -4, 10]);
        let zero = tensor_i64(vec![1], vec![0])?;
        assert!(run(Kind::Div, &a, &zero).is_err());
        assert!(run(Kind::Add, &a, &ramp(&[4], 1.0)?).is_err());
        Ok(())
    }

    #[test]
    fn pow_takes_float_or_integer_exponents() -> Result<(), String> {
        let a = tensor_f32(vec![3], vec![-2.0, 0.5, 3.0])?;
        let two = tensor_f32(vec![], vec![2.0])?;
        assert_eq!(f32s(&run(Kind::Pow, &a, &two)?)?, &[4.0, 0.25, 9.0]);
        let three = tensor_i64(vec![1], vec![3])?;
        assert_eq!(f32s(&run(Kind::Pow, &a, &three)?)?, &[-8.0, 0.125, 27.0]);
        let half = tensor_f32(vec![], vec![0.5])?;
        let r = run(Kind::Pow, &tensor_f32(vec![2], vec![4.0, 9.0])?, &half)?;
        assert_eq!(f32s(&r)?, &[2.0, 3.0]);
        assert!(run(Kind::Pow, &three, &two).is_err());
        Ok(())
    }

    #[test]
    fn infer_broadcasts_symbolic_shapes_and_checks_types() -> Result<(), String> {
        let node = Node::new("n", "Add", vec![Some(0), Some(1)], vec![2]);
        let ta = ValueType::new(DType::F32, vec![Dim::sym("batch"), Dim::fixed(1), Dim::fixed(384)]);
        let tb = ValueType::new(DType::F32, fixed_shape(&[7, 1]));
        let ins =
            [InferInput { ty: Some(&ta), ..Default::default() }, InferInput { ty: Some(&tb), ..Default::default() }];
        let out = Binary(Kind::Add).infer(&node, &ins)?;
        assert_eq!(out[0].ty.shape, Some(vec![Dim::sym("batch"), Dim::fixed(7), Dim::fixed(384)]));
        assert_eq!(out[0].sym, None);
        let ti = ValueType::new(DType::I64, fixed_shape(&[1]));
        let mixed =
            [InferInput { ty: Some(&ta), ..Default::default() }, InferInput { ty: Some(&ti), ..Default::default() }];
        assert!(Binary(Kind::Add).infer(&node, &mixed).is_err());
        let bad = [
            InferInput { ty: Some(&ta), ..Default::default() },
            InferInput { ty: Some(&ValueType::new(DType::F32, fixed_shape(&[3]))), ..Default::default() },
        ];
        assert!(Binary(Kind::Mul).infer(&node, &bad).is_err());
        assert!(Binary(Kind::Add).check(&Node::new("n", "Add", vec![Some(0)], vec![1])).is_err());
        Ok(())
    }

    #[test]
    fn integer_ops_propagate_symbolic_contents() -> Result<(), String> {
        let node = Node::new("n", "Mul", vec![Some(0), Some(1)], vec![2]);
        let t1 = ValueType::new(DType::I64, fixed_shape(&[1]));
        let batch = [Dim::sym("batch")];
        let twelve = tensor_i64(vec![1], vec![12])?;
        let sym_in = InferInput { ty: Some(&t1), sym: Some(&batch), ..Default::default() };
        let const_in = InferInput { ty: Some(&t1), constant: Some(&twelve), ..Default::default() };
        let mul = Binary(Kind::Mul).infer(&node, &[sym_in, const_in])?;
        assert_eq!(mul[0].sym, Some(vec![Dim::sym("batch").mul(&Dim::fixed(12))]));
        assert_eq!(mul[0].ty.shape, Some(fixed_shape(&[1])));

        // [batch, seq, 384] / [1, 1, 12]: the last entry divides exactly.
        let t3 = ValueType::new(DType::I64, fixed_shape(&[3]));
        let shape = [Dim::sym("batch"), Dim::sym("seq"), Dim::fixed(384)];
        let div_by = tensor_i64(vec![3], vec![1, 1, 12])?;
        let ins = [
            InferInput { ty: Some(&t3), sym: Some(&shape), ..Default::default() },
            InferInput { ty: Some(&t3), constant: Some(&div_by), ..Default::default() },
        ];
        let div = Binary(Kind::Div).infer(&node, &ins)?;
        assert_eq!(div[0].sym, Some(vec![Dim::sym("batch"), Dim::sym("seq"), Dim::fixed(32)]));
        // Inexact division and sums of symbols are not monomials.
        let by_five = tensor_i64(vec![1], vec![5])?;
        let inexact = [ins[0], InferInput { ty: Some(&t1), constant: Some(&by_five), ..Default::default() }];
        assert_eq!(Binary(Kind::Div).infer(&node, &inexact)?[0].sym, None);
        assert_eq!(Binary(Kind::Add).infer(&node, &[sym_in, const_in])?[0].sym, None);
        let fixed = [Dim::fixed(30)];
        let f_in = InferInput { ty: Some(&t1), sym: Some(&fixed), ..Default::default() };
        assert_eq!(Binary(Kind::Sub).infer(&node, &[f_in, const_in])?[0].sym, Some(vec![Dim::fixed(18)]));
        // Without known contents on both sides there is nothing to propagate.
        let unknown = InferInput { ty: Some(&t1), ..Default::default() };
        assert_eq!(Binary(Kind::Mul).infer(&node, &[sym_in, unknown])?[0].sym, None);
        // Large integer data (position ids, say) is not tracked.
        let t100 = ValueType::new(DType::I64, fixed_shape(&[100]));
        let ids = tensor_i64(vec![100], (0..100).collect())?;
        let big = InferInput { ty: Some(&t100), constant: Some(&ids), ..Default::default() };
        assert_eq!(Binary(Kind::Mul).infer(&node, &[big, const_in])?[0].sym, None);
        Ok(())
    }
}
