//! ReduceMean and ReduceSum. Axes come from the `axes` attribute (ReduceSum
//! before opset 13, ReduceMean before 18) or from the optional second input;
//! both forms are accepted at any opset. Sums accumulate in f64.

use crate::Tensor;
use crate::graph::{Dim, Node, ValueType};
use crate::ops::util::{broadcast_strides, expect_f32, f32s, input, input_type, ints, norm_axis, tensor_f32};
use crate::ops::{InferInput, Inferred, OpDef, Registry};

use super::{checked_numel, for_each_run};

#[derive(Debug)]
pub(super) struct Reduce {
    mean: bool,
}

pub(super) fn register(r: &mut Registry) {
    r.add(Reduce { mean: true });
    r.add(Reduce { mean: false });
}

/// Which axes a node reduces for a given rank: `None` is the identity
/// (`noop_with_empty_axes` with no axes).
fn reduced_axes(node: &Node, axes: Option<Vec<i64>>, rank: usize) -> Result<Option<Vec<bool>>, String> {
    let axes = match node.attrs.ints("axes")? {
        Some(a) => a.to_vec(),
        None => axes.unwrap_or_default(),
    };
    if axes.is_empty() {
        return Ok((node.attrs.int("noop_with_empty_axes", 0)? == 0).then(|| vec![true; rank]));
    }
    let mut mask = vec![false; rank];
    for a in axes {
        let i = norm_axis(a, rank)?;
        if std::mem::replace(&mut mask[i], true) {
            return Err(format!("axis {a} is repeated"));
        }
    }
    Ok(Some(mask))
}

fn keepdims(node: &Node) -> Result<bool, String> {
    Ok(node.attrs.int("keepdims", 1)? != 0)
}

impl OpDef for Reduce {
    fn name(&self) -> &'static str {
        if self.mean { "ReduceMean" } else { "ReduceSum" }
    }

    fn check(&self, node: &Node) -> Result<(), String> {
        if node.input(0).is_none() || node.inputs.len() > 2 || node.outputs.len() != 1 {
            return Err(format!("{} takes data and optional axes, and has one output", self.name()));
        }
        if node.attrs.ints("axes")?.is_some() && node.input(1).is_some() {
            return Err("axes given both as an attribute and as an input".into());
        }
        keepdims(node)?;
        node.attrs.int("noop_with_empty_axes", 0).map(drop)
    }

    fn infer(&self, node: &Node, inputs: &[InferInput<'_>]) -> Result<Vec<Inferred>, String> {
        let t = input_type(inputs, 0)?;
        expect_f32(t)?;
        let axes_input = inputs.get(1).filter(|i| i.ty.is_some() || i.constant.is_some());
        let axes = match axes_input {
            None => Some(None),
            Some(i) => match (i.constant, i.sym) {
                (Some(c), _) => Some(Some(ints(c)?)),
                (None, Some(s)) => s.iter().map(Dim::as_fixed).collect::<Option<Vec<i64>>>().map(Some),
                (None, None) => None,
            },
        };
        // Axes computed at run time leave the output shape unknown.
        let shape = match (&t.shape, axes) {
            (Some(s), Some(axes)) => match reduced_axes(node, axes, s.len())? {
                None => Some(s.clone()),
                Some(mask) => {
                    let keep = keepdims(node)?;
                    Some(
                        s.iter()
                            .zip(&mask)
                            .filter_map(|(d, &r)| match (r, keep) {
                                (false, _) => Some(d.clone()),
                                (true, true) => Some(Dim::fixed(1)),
                                (true, false) => None,
                            })
                            .collect(),
                    )
                }
            },
            _ => None,
        };
        Ok(vec![Inferred::new(ValueType { dtype: t.dtype, shape })])
    }

    fn eval(&self, node: &Node, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, String> {
        let t = input(inputs, 0)?;
        let x = f32s(t)?;
        let dims = t.shape();
        let axes = inputs.get(1).copied().flatten().map(ints).transpose()?;
        let Some(mask) = reduced_axes(node, axes, dims.len())? else {
            return Ok(vec![t.clone()]);
        };
        let kept: Vec<usize> = dims.iter().zip(&mask).map(|(&d, &r)| if r { 1 } else { d }).collect();
        let count: usize = dims.iter().zip(&mask).filter(|(_, r)| **r).map(|(&d, _)| d).product();
        let mut acc = vec![0.0f64; checked_numel(&kept)?];
        let (sx, so) = (broadcast_strides(dims, dims), broadcast_strides(&kept, dims));
        for_each_run(dims, &sx, &so, |ox, oo, len, dx, doo| match (dx, doo) {
            (1, 0) => acc[oo] += x[ox..ox + len].iter().map(|&v| f64::from(v)).sum::<f64>(),
            (1, 1) => acc[oo..oo + len].iter_mut().zip(&x[ox..ox + len]).for_each(|(a, &v)| *a += f64::from(v)),
            _ => (0..len).for_each(|i| acc[oo + i * doo] += f64::from(x[ox + i * dx])),
        });
        let scale = if self.mean { 1.0 / count as f64 } else { 1.0 };
        let out = acc.into_iter().map(|v| (v * scale) as f32).collect();
        let shape = if keepdims(node)? {
            kept
        } else {
            dims.iter().zip(&mask).filter(|(_, r)| !**r).map(|(&d, _)| d).collect()
        };
        Ok(vec![tensor_f32(shape, out)?])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DType;
    use crate::graph::{Attr, fixed_shape};
    use crate::ops::util::tensor_i64;

    fn node(mean: bool, axes: Option<&[i64]>, keep: i64) -> Node {
        let n = Node::new("r", if mean { "ReduceMean" } else { "ReduceSum" }, vec![Some(0)], vec![1])
            .with_attr("keepdims", Attr::Int(keep));
        match axes {
            Some(a) => n.with_attr("axes", Attr::Ints(a.to_vec())),
            None => n,
        }
    }

    fn data() -> Result<Tensor, String> {
        tensor_f32(vec![2, 3, 4], (0..24).map(|i| i as f32 * 0.5 - 3.0).collect())
    }

    /// Mean over axes by explicit loops, output in row-major order of kept axes.
    fn naive_mean(x: &[f32], reduce: [bool; 3]) -> Vec<f32> {
        let dims = [2usize, 3, 4];
        let outer = |a: usize| if reduce[a] { 1 } else { dims[a] };
        let range = |a: usize, i: usize| if reduce[a] { 0..dims[a] } else { i..i + 1 };
        let mut out = Vec::new();
        for i in 0..outer(0) {
            for j in 0..outer(1) {
                for k in 0..outer(2) {
                    let (mut s, mut c) = (0.0f64, 0.0);
                    for a in range(0, i) {
                        for b in range(1, j) {
                            for d in range(2, k) {
                                s += f64::from(x[a * 12 + b * 4 + d]);
                                c += 1.0;
                            }
                        }
                    }
                    out.push((s / c) as f32);
                }
            }
        }
        out
    }

    #[test]
    fn mean_over_several_axes_with_and_without_keepdims() -> Result<(), String> {
        let t = data()?;
        let x = f32s(&t)?.to_vec();
        // (axes, reduced mask, shape with keepdims, shape without)
        type Case = (&'static [i64], [bool; 3], Vec<usize>, Vec<usize>);
        let cases: [Case; 5] = [
            (&[-1], [false, false, true], vec![2, 3, 1], vec![2, 3]),
            (&[0, 2], [true, false, true], vec![1, 3, 1], vec![3]),
            (&[1], [false, true, false], vec![2, 1, 4], vec![2, 4]),
            (&[0, 1], [true, true, false], vec![1, 1, 4], vec![4]),
            (&[2, 0, 1], [true, true, true], vec![1, 1, 1], vec![]),
        ];
        for (axes, mask, keep_shape, drop_shape) in cases {
            let want = naive_mean(&x, mask);
            for (keep, shape) in [(1, &keep_shape), (0, &drop_shape)] {
                let out = Reduce { mean: true }.eval(&node(true, Some(axes), keep), &[Some(&t)])?;
                assert_eq!(out[0].shape(), shape.as_slice(), "axes {axes:?} keepdims {keep}");
                let got = f32s(&out[0])?;
                assert!(got.iter().zip(&want).all(|(a, b)| (a - b).abs() < 1e-6), "{axes:?}: {got:?} vs {want:?}");
            }
        }
        assert!(Reduce { mean: true }.eval(&node(true, Some(&[0, -3]), 1), &[Some(&t)]).is_err());
        assert!(Reduce { mean: true }.eval(&node(true, Some(&[3]), 1), &[Some(&t)]).is_err());
        Ok(())
    }

    #[test]
    fn sum_with_axes_input_empty_axes_and_noop() -> Result<(), String> {
        let t = data()?;
        let axes = tensor_i64(vec![1], vec![1])?;
        let n = Node::new("r", "ReduceSum", vec![Some(0), Some(1)], vec![2]).with_attr("keepdims", Attr::Int(0));
        let out = Reduce { mean: false }.eval(&n, &[Some(&t), Some(&axes)])?;
        assert_eq!(out[0].shape(), &[2, 4]);
        // x[i, j, k] = 6i + 2j + k/2 - 3 summed over j: 18i + 6 + 1.5k - 9.
        let want: Vec<f32> = (0..2).flat_map(|i| (0..4).map(move |k| 18.0 * i as f32 - 3.0 + 1.5 * k as f32)).collect();
        assert_eq!(f32s(&out[0])?, want.as_slice());
        // No axes: everything reduced, unless noop_with_empty_axes.
        let all = Reduce { mean: false }.eval(&node(false, None, 1), &[Some(&t)])?;
        assert_eq!(all[0].shape(), &[1, 1, 1]);
        assert_eq!(f32s(&all[0])?, &[66.0]);
        let noop = node(false, None, 1).with_attr("noop_with_empty_axes", Attr::Int(1));
        assert_eq!(Reduce { mean: false }.eval(&noop, &[Some(&t)])?[0], t);
        Ok(())
    }

    #[test]
    fn infer_shapes_from_attribute_constant_or_unknown_axes() -> Result<(), String> {
        let ty = ValueType::new(DType::F32, vec![Dim::sym("batch"), Dim::sym("seq"), Dim::fixed(384)]);
        let x = InferInput { ty: Some(&ty), ..Default::default() };
        let out = Reduce { mean: true }.infer(&node(true, Some(&[-1]), 1), &[x])?;
        assert_eq!(out[0].ty.shape, Some(vec![Dim::sym("batch"), Dim::sym("seq"), Dim::fixed(1)]));
        let axes = tensor_i64(vec![2], vec![0, 1])?;
        let ta = ValueType::new(DType::I64, fixed_shape(&[2]));
        let n = Node::new("r", "ReduceMean", vec![Some(0), Some(1)], vec![2]).with_attr("keepdims", Attr::Int(0));
        let c = InferInput { ty: Some(&ta), constant: Some(&axes), ..Default::default() };
        assert_eq!(Reduce { mean: true }.infer(&n, &[x, c])?[0].ty.shape, Some(fixed_shape(&[384])));
        let folded = [Dim::fixed(0), Dim::fixed(1)];
        let known = InferInput { ty: Some(&ta), sym: Some(&folded), ..Default::default() };
        assert_eq!(Reduce { mean: true }.infer(&n, &[x, known])?[0].ty.shape, Some(fixed_shape(&[384])));
        let unknown = InferInput { ty: Some(&ta), ..Default::default() };
        assert_eq!(Reduce { mean: true }.infer(&n, &[x, unknown])?[0].ty.shape, None);
        let both = n.with_attr("axes", Attr::Ints(vec![0]));
        assert!(Reduce { mean: true }.check(&both).is_err());
        Ok(())
    }
}
