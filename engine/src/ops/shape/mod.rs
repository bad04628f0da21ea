//! Shape and data-movement ops. Data movement is written once, dtype-generic:
//! an op computes, for every output element, the flat index it reads, and
//! [`take`] copies those elements whatever the element type. Integer ops also
//! propagate `sym` (symbolic contents of shape tensors) during inference.

mod cast;
mod concat;
mod constant_of_shape;
mod equal;
mod expand;
mod gather;
mod identity;
mod not;
mod range;
mod reshape;
mod shape_of;
mod slice;
mod squeeze;
mod transpose;
mod unsqueeze;
mod where_op;

use crate::graph::{Dim, Node, Shape, ValueType};
use crate::{DType, Tensor, TensorData};

use super::util::ints;
use super::{InferInput, Registry};

pub(crate) fn register(r: &mut Registry) {
    r.add(cast::Cast);
    r.add(concat::Concat);
    r.add(constant_of_shape::ConstantOfShape);
    r.add(equal::Equal);
    r.add(expand::Expand);
    r.add(gather::Gather);
    r.add(identity::Identity);
    r.add(not::Not);
    r.add(range::Range);
    r.add(reshape::Reshape);
    r.add(shape_of::ShapeOp);
    r.add(slice::Slice);
    r.add(squeeze::Squeeze);
    r.add(transpose::Transpose);
    r.add(unsqueeze::Unsqueeze);
    r.add(where_op::Where);
}

/// Largest element count an op here will materialise: a corrupt shape input
/// must give an error, not an allocation failure that aborts the process.
const MAX_ELEMENTS: usize = 1 << 31;

/// Longest integer tensor whose contents inference tracks as `sym`.
const MAX_SYM_LEN: usize = 1024;

/// Element count of `shape`, bounded by [`MAX_ELEMENTS`].
pub(super) fn checked_numel(shape: &[usize]) -> Result<usize, String> {
    shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .filter(|&n| n <= MAX_ELEMENTS)
        .ok_or_else(|| format!("shape {shape:?} has too many elements"))
}

/// A dimension inference cannot know, named after the node so that it is
/// distinct from every other unknown.
pub(super) fn fresh(node: &Node, what: impl std::fmt::Display) -> Dim {
    Dim::sym(format!("{}:{what}", node.name))
}

/// Contents of a 0-d or 1-d integer input known at inference: its constant
/// or its `sym`.
pub(super) fn int_dims(inp: Option<&InferInput<'_>>) -> Option<Vec<Dim>> {
    let inp = inp?;
    if let Some(t) = inp.constant {
        if t.shape().len() > 1 || t.shape().iter().product::<usize>() > MAX_SYM_LEN {
            return None;
        }
        return ints(t).ok().map(|v| v.into_iter().map(Dim::fixed).collect());
    }
    inp.sym.map(<[Dim]>::to_vec)
}

/// Integer contents known at inference with every entry fixed (axes, starts…).
pub(super) fn known_ints(inp: Option<&InferInput<'_>>) -> Option<Vec<i64>> {
    int_dims(inp)?.iter().map(Dim::as_fixed).collect()
}

/// Whether an input could carry `sym` (integer contents).
pub(super) fn is_int(dtype: DType) -> bool {
    matches!(dtype, DType::I64 | DType::I32)
}

/// Number of entries of a 1-d integer input, from its type, when fixed.
pub(super) fn vec_len(inp: Option<&InferInput<'_>>) -> Option<usize> {
    let shape = inp?.ty?.shape.as_ref()?;
    match shape.as_slice() {
        [] => Some(1),
        [d] => d.as_fixed().and_then(|n| usize::try_from(n).ok()),
        _ => None,
    }
}

/// Input `i` of an inference call, `None` when the node omits it.
pub(super) fn infer_input<'a, 'b>(node: &Node, inputs: &'b [InferInput<'a>], i: usize) -> Option<&'b InferInput<'a>> {
    node.input(i).and(inputs.get(i))
}

/// Integer contents of an optional evaluated input.
pub(super) fn opt_ints(inputs: &[Option<&Tensor>], i: usize) -> Result<Option<Vec<i64>>, String> {
    inputs.get(i).copied().flatten().map(ints).transpose()
}

pub(super) fn ty(dtype: DType, shape: Shape) -> ValueType {
    ValueType::new(dtype, shape)
}

/// Row-major strides.
pub(super) fn row_strides(shape: &[usize]) -> Vec<usize> {
    let mut strides = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        strides[i] = strides[i + 1] * shape[i + 1];
    }
    strides
}

/// For each element of `out` in row-major order, `base + Σ index_i · strides_i`:
/// the flat input index an affine view (transpose, slice, broadcast) reads.
pub(super) fn strided_indices(out: &[usize], strides: &[i64], base: i64) -> Result<Vec<usize>, String> {
    let n = checked_numel(out)?;
    let mut idx = vec![0usize; out.len()];
    let mut at = base;
    let mut result = Vec::with_capacity(n);
    for _ in 0..n {
        result.push(usize::try_from(at).map_err(|_| format!("view reads before the start of its input ({at})"))?);
        for d in (0..out.len()).rev() {
            idx[d] += 1;
            at += strides[d];
            if idx[d] < out[d] {
                break;
            }
            at -= strides[d] * out[d] as i64;
            idx[d] = 0;
        }
    }
    Ok(result)
}

fn pick<T: Clone>(v: &[T], idx: &[usize]) -> Vec<T> {
    idx.iter().map(|&i| v[i].clone()).collect()
}

/// The tensor of shape `shape` whose elements are `t`'s at flat indices `idx`.
pub(super) fn take(t: &Tensor, shape: Vec<usize>, idx: &[usize]) -> Result<Tensor, String> {
    let len = t.data().len();
    if let Some(&bad) = idx.iter().find(|&&i| i >= len) {
        return Err(format!("index {bad} is past the {len} elements of the input"));
    }
    let data = match t.data() {
        TensorData::Bool(v) => TensorData::Bool(pick(v, idx)),
        TensorData::U8(v) => TensorData::U8(pick(v, idx)),
        TensorData::I8(v) => TensorData::I8(pick(v, idx)),
        TensorData::I16(v) => TensorData::I16(pick(v, idx)),
        TensorData::I32(v) => TensorData::I32(pick(v, idx)),
        TensorData::I64(v) => TensorData::I64(pick(v, idx)),
        TensorData::F16(v) => TensorData::F16(pick(v, idx)),
        TensorData::F32(v) => TensorData::F32(pick(v, idx)),
        TensorData::F64(v) => TensorData::F64(pick(v, idx)),
        TensorData::Bytes(v) => TensorData::Bytes(pick(v, idx)),
    };
    Tensor::new(shape, data).map_err(|e| e.to_string())
}

/// The same data under another shape.
pub(super) fn reshaped(t: &Tensor, shape: Vec<usize>) -> Result<Tensor, String> {
    Tensor::new(shape, t.data().clone()).map_err(|e| e.to_string())
}

/// Normalises a list of axes for `rank`, rejecting repeats.
pub(super) fn norm_axes(axes: &[i64], rank: usize) -> Result<Vec<usize>, String> {
    let mut out = Vec::with_capacity(axes.len());
    for &a in axes {
        let a = super::util::norm_axis(a, rank)?;
        if out.contains(&a) {
            return Err(format!("axis {a} is repeated in {axes:?}"));
        }
        out.push(a);
    }
    Ok(out)
}

#[cfg(test)]
pub(super) mod test_util {
    use crate::graph::{Attr, Dim, Node, ValueType};
    use crate::ops::{InferInput, Inferred, registry};
    use crate::{DType, Tensor};

    pub fn node(op: &str, inputs: usize, attrs: &[(&str, Attr)]) -> Node {
        let mut n = Node::new(format!("{op}_0"), op, (0..inputs).map(Some).collect(), vec![inputs]);
        for (k, v) in attrs {
            n.attrs.insert(*k, v.clone());
        }
        n
    }

    pub fn eval(node: &Node, inputs: &[&Tensor]) -> Result<Tensor, String> {
        let op = registry().get(&node.op).ok_or("op not registered")?;
        let refs: Vec<Option<&Tensor>> = inputs.iter().map(|t| Some(*t)).collect();
        op.eval(node, &refs)?.into_iter().next().ok_or_else(|| "no output".to_string())
    }

    pub fn infer(node: &Node, inputs: &[InferInput<'_>]) -> Result<Inferred, String> {
        let op = registry().get(&node.op).ok_or("op not registered")?;
        op.infer(node, inputs)?.into_iter().next().ok_or_else(|| "no output".to_string())
    }

    /// Inference input for a constant tensor.
    pub fn konst<'a>(t: &'a Tensor, ty: &'a ValueType) -> InferInput<'a> {
        InferInput { ty: Some(ty), constant: Some(t), sym: None }
    }

    pub fn vt(t: &Tensor) -> ValueType {
        ValueType::new(t.dtype(), crate::graph::fixed_shape(t.shape()))
    }

    pub fn d(s: &str) -> Dim {
        Dim::sym(s)
    }

    pub fn f(n: i64) -> Dim {
        Dim::fixed(n)
    }

    pub fn i64t(shape: &[usize], v: &[i64]) -> Tensor {
        crate::ops::util::tensor_i64(shape.to_vec(), v.to_vec()).unwrap_or_else(|e| panic!("{e}"))
    }

    pub fn f32t(shape: &[usize], v: &[f32]) -> Tensor {
        crate::ops::util::tensor_f32(shape.to_vec(), v.to_vec()).unwrap_or_else(|e| panic!("{e}"))
    }

    pub fn boolt(shape: &[usize], v: &[bool]) -> Tensor {
        crate::ops::util::tensor_bool(shape.to_vec(), v.to_vec()).unwrap_or_else(|e| panic!("{e}"))
    }

    pub fn sym_ty(dtype: DType, shape: Vec<Dim>) -> ValueType {
        ValueType::new(dtype, shape)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::{Attr, Graph, Node, fixed_shape};
    use crate::ops::util::{i64s, tensor_f32};
    use crate::reference::{RunOptions, run};
    use test_util::{d, f, i64t};

    #[test]
    fn strided_views_and_take_any_dtype() -> Result<(), String> {
        assert_eq!(row_strides(&[2, 3, 4]), vec![12, 4, 1]);
        // A transpose of a 2×3 matrix.
        assert_eq!(strided_indices(&[3, 2], &[1, 3], 0)?, vec![0, 3, 1, 4, 2, 5]);
        // A reversed view.
        assert_eq!(strided_indices(&[3], &[-1], 2)?, vec![2, 1, 0]);
        assert!(strided_indices(&[2], &[-1], 0).is_err());
        let t = Tensor::new(vec![3], TensorData::Bytes(vec![b"a".to_vec(), b"b".to_vec(), b"c".to_vec()]))
            .map_err(|e| e.to_string())?;
        let r = take(&t, vec![2], &[2, 0])?;
        assert_eq!(r.data(), &TensorData::Bytes(vec![b"c".to_vec(), b"a".to_vec()]));
        assert!(take(&t, vec![1], &[3]).is_err());
        assert!(checked_numel(&[usize::MAX, 2]).is_err());
        assert_eq!(norm_axes(&[-1, 0], 3)?, vec![2, 0]);
        assert!(norm_axes(&[1, -2], 3).is_err());
        Ok(())
    }

    /// The shape subgraph every BERT export has in front of its head split:
    /// Shape → Gather(0/1) → Unsqueeze → Concat with [12, 32] → Reshape.
    fn bert_head_split() -> Result<(Graph, usize), String> {
        let mut g = Graph::new("bert", 17);
        let x = g.add_value("x", Some(ValueType::new(DType::F32, vec![d("batch"), d("seq"), f(384)])));
        g.inputs.push(x);
        let s = g.add_value("s", None);
        g.nodes.push(Node::new("shape", "Shape", vec![Some(x)], vec![s]));
        let axes = g.add_constant("axes", i64t(&[1], &[0]));
        let mut parts = Vec::new();
        for i in 0..2 {
            let idx = g.add_constant(format!("i{i}"), i64t(&[], &[i]));
            let dim = g.add_value(format!("dim{i}"), None);
            g.nodes.push(Node::new(format!("gather{i}"), "Gather", vec![Some(s), Some(idx)], vec![dim]));
            let u = g.add_value(format!("u{i}"), None);
            g.nodes.push(Node::new(format!("unsq{i}"), "Unsqueeze", vec![Some(dim), Some(axes)], vec![u]));
            parts.push(Some(u));
        }
        parts.push(Some(g.add_constant("heads", i64t(&[1], &[12]))));
        parts.push(Some(g.add_constant("size", i64t(&[1], &[32]))));
        let target = g.add_value("target", None);
        g.nodes.push(Node::new("concat", "Concat", parts, vec![target]).with_attr("axis", Attr::Int(0)));
        let y = g.add_value("y", None);
        g.nodes.push(Node::new("reshape", "Reshape", vec![Some(x), Some(target)], vec![y]));
        g.outputs = vec![y, target];
        crate::infer::infer_shapes(&mut g).map_err(|e| e.to_string())?;
        Ok((g, y))
    }

    #[test]
    fn sym_flows_through_a_bert_shape_subgraph() -> Result<(), String> {
        let (g, y) = bert_head_split()?;
        let target = g.outputs[1];
        assert_eq!(g.values[target].sym, Some(vec![d("batch"), d("seq"), f(12), f(32)]));
        assert_eq!(g.shape(y), Some(&vec![d("batch"), d("seq"), f(12), f(32)]));
        let s = g.values.iter().find(|v| v.name == "s").and_then(|v| v.sym.clone());
        assert_eq!(s, Some(vec![d("batch"), d("seq"), f(384)]));
        // Gather of a scalar index is 0-d; Unsqueeze makes it 1-d, same contents.
        let dim1 = g.values.iter().find(|v| v.name == "dim1").ok_or("no dim1")?;
        assert_eq!(dim1.ty.as_ref().and_then(|t| t.shape.clone()), Some(vec![]));
        assert_eq!(dim1.sym, Some(vec![d("seq")]));

        // And the same graph runs.
        let input = tensor_f32(vec![2, 3, 384], (0..2 * 3 * 384).map(|i| i as f32).collect())?;
        let out = run(&g, &[input], RunOptions::default()).map_err(|e| e.to_string())?;
        assert_eq!(out[0].shape(), &[2, 3, 12, 32]);
        assert_eq!(out[0].as_f32().map(|v| v[385]), Some(385.0));
        assert_eq!(i64s(&out[1])?, &[2, 3, 12, 32]);
        Ok(())
    }

    #[test]
    fn every_op_is_registered() {
        let reg = crate::ops::registry();
        for op in [
            "Reshape",
            "Transpose",
            "Gather",
            "Concat",
            "Slice",
            "Unsqueeze",
            "Squeeze",
            "Shape",
            "Cast",
            "Where",
            "Equal",
            "Not",
            "Expand",
            "Range",
            "ConstantOfShape",
            "Identity",
        ] {
            assert!(reg.get(op).is_some(), "{op} missing");
        }
        assert_eq!(fixed_shape(&[2]), vec![f(2)]);
    }
}
