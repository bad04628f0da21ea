//! Shape-subgraph folding. Shape inference records the symbolic contents of
//! small integer tensors (`Value::sym`); a value whose contents are fully known
//! becomes a constant, and a Reshape/Expand whose target shape is computed at run
//! time from the input's own dims (BERT's `Shape → Gather → Unsqueeze → Concat`)
//! gets a constant target instead, using Reshape's `0` (copy the dim) and `-1`
//! (infer it) and Expand's `1` (keep the dim). The dead chains go to DCE.

use std::collections::HashSet;
use std::sync::Arc;

use super::rewrite::{new_constant, remove_nodes};
use super::{Pass, PassContext, PassStats};
use crate::graph::{Dim, Graph, GraphError, Node, ValueId};
use crate::{DType, Tensor, TensorData};

#[derive(Debug, Clone, Copy, Default)]
pub struct ShapeFolding;

impl Pass for ShapeFolding {
    fn name(&self) -> &'static str {
        "shape_fold"
    }

    fn run(&self, graph: &mut Graph, cx: &PassContext) -> Result<PassStats, GraphError> {
        let _ = cx;
        let mut dead = HashSet::new();
        let (mut values, mut reshapes, mut expands) = (0usize, 0usize, 0usize);
        for i in 0..graph.nodes.len() {
            let node = &graph.nodes[i];
            let known: Option<Vec<Tensor>> = node.outputs.iter().map(|&o| known_contents(graph, o)).collect();
            if let Some(known) = known.filter(|k| !k.is_empty()) {
                for (o, t) in node.outputs.clone().into_iter().zip(known) {
                    graph.values[o].constant = Some(Arc::new(t));
                    graph.values[o].sym = None;
                    values += 1;
                }
                dead.insert(i);
                continue;
            }
            let target = match node.op.as_str() {
                "Reshape" => reshape_target(graph, node),
                "Expand" => expand_target(graph, node),
                _ => None,
            };
            if let Some(target) = target {
                let n = target.len();
                let t = Tensor::new(vec![n], TensorData::I64(target))
                    .map_err(|e| GraphError::Invalid(format!("shape constant: {e}")))?;
                let hint = format!("{}_shape", graph.nodes[i].name);
                let c = new_constant(graph, &hint, t);
                let node = &mut graph.nodes[i];
                if node.op == "Reshape" {
                    // The target has no literal zeros (reshape_target refuses them under
                    // allowzero), so its 0s are copies and allowzero must be off.
                    node.attrs.remove("allowzero");
                    reshapes += 1;
                } else {
                    expands += 1;
                }
                node.inputs[1] = Some(c);
            }
        }
        remove_nodes(graph, &dead);
        let mut notes = Vec::new();
        for (n, what) in [(values, "shape value(s) made constant"), (reshapes, "Reshape"), (expands, "Expand")] {
            if n > 0 {
                notes.push(if what.starts_with("shape") {
                    format!("{n} {what}")
                } else {
                    format!("{what} with constant target ×{n}")
                });
            }
        }
        Ok(PassStats { rewrites: values + reshapes + expands, notes })
    }
}

/// The contents of `v` as a constant, when shape inference knows every entry.
fn known_contents(graph: &Graph, v: ValueId) -> Option<Tensor> {
    let val = graph.value(v);
    if val.constant.is_some() {
        return None;
    }
    let sym = val.sym.as_ref()?;
    let ints: Vec<i64> = sym.iter().map(Dim::as_fixed).collect::<Option<_>>()?;
    let ty = val.ty.as_ref()?;
    let dims: Vec<usize> =
        ty.shape.as_ref()?.iter().map(|d| d.as_fixed().and_then(|n| usize::try_from(n).ok())).collect::<Option<_>>()?;
    if dims.iter().product::<usize>() != ints.len() {
        return None;
    }
    let data = match ty.dtype {
        DType::I64 => TensorData::I64(ints),
        DType::I32 => TensorData::I32(ints.into_iter().map(i32::try_from).collect::<Result<_, _>>().ok()?),
        _ => return None,
    };
    Tensor::new(dims, data).ok()
}

/// A run-time computed target shape, with a symbolic part, of node input 1.
fn symbolic_target<'g>(graph: &'g Graph, node: &Node) -> Option<(&'g [Dim], &'g [Dim])> {
    let target = node.input(1)?;
    let val = graph.value(target);
    if val.constant.is_some() {
        return None;
    }
    let sym = val.sym.as_deref()?;
    if sym.iter().all(Dim::is_fixed) {
        return None;
    }
    let input = graph.shape(node.input(0)?)?;
    Some((sym, input))
}

/// Reshape's target with input dims copied (`0`) and at most one inferred (`-1`).
fn reshape_target(graph: &Graph, node: &Node) -> Option<Vec<i64>> {
    let allowzero = node.attrs.int("allowzero", 0).ok()? != 0;
    let (sym, input) = symbolic_target(graph, node)?;
    // Under allowzero a literal 0 means an empty dim, which a copy marker cannot express.
    if allowzero && sym.iter().any(|d| d.as_fixed() == Some(0)) {
        return None;
    }
    let mut inferred = false;
    let mut out = Vec::with_capacity(sym.len());
    for (i, d) in sym.iter().enumerate() {
        let n = match d.as_fixed() {
            Some(n) => n,
            None if input.get(i) == Some(d) => 0,
            None => -1,
        };
        if n == -1 {
            if inferred {
                return None;
            }
            inferred = true;
        }
        out.push(n);
    }
    Some(out)
}

/// Expand's target with dims equal to the (right-aligned) input dim set to 1.
fn expand_target(graph: &Graph, node: &Node) -> Option<Vec<i64>> {
    let (sym, input) = symbolic_target(graph, node)?;
    let offset = input.len() as isize - sym.len() as isize;
    sym.iter()
        .enumerate()
        .map(|(i, d)| match d.as_fixed() {
            Some(n) => Some(n),
            None => {
                let j = usize::try_from(i as isize + offset).ok()?;
                (input.get(j) == Some(d)).then_some(1)
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use kiln_onnx::{GraphBuilder, attr_int};

    use super::super::testing::*;
    use super::super::{DeadNodeElimination, PassContext, run_pass};
    use super::*;

    const TOL: f32 = 1e-6;

    /// `Unsqueeze(Gather(Shape(x), axis), [0])`: one dim of `x` as a 1-D tensor.
    fn dim_of(b: &mut GraphBuilder, x: &str, axis: i64) -> Result<String, kiln_onnx::OnnxError> {
        let s = b.add_node("Shape", &[x], vec![])?;
        let i = b.unique_name("axis");
        b.add_initializer(kiln_onnx::tensor_i64(&i, &[], &[axis])?)?;
        let d = b.add_node("Gather", &[&s, &i], vec![attr_int("axis", 0)])?;
        let zero = ints(b, "zero", &[0])?;
        b.add_node("Unsqueeze", &[&d, &zero], vec![])
    }

    fn target(g: &Graph, op: &str) -> Option<Vec<i64>> {
        let node = g.nodes.iter().find(|n| n.op == op)?;
        crate::ops::util::ints(g.constant(node.input(1)?)?).ok()
    }

    #[test]
    fn bert_style_reshape_gets_a_constant_target() -> TestResult {
        let mut rng = Lcg::new(1);
        let mut b = GraphBuilder::new("t");
        input_dims(&mut b, "x", &[sym("batch"), sym("seq"), kiln_onnx::Dim::Fixed(8)])?;
        let n = dim_of(&mut b, "x", 0)?;
        let s = dim_of(&mut b, "x", 1)?;
        let heads = ints(&mut b, "heads", &[2, 4])?;
        let shape = b.add_node("Concat", &[&n, &s, &heads], vec![attr_int("axis", 0)])?;
        let split = b.add_node("Reshape", &["x", &shape], vec![])?;
        // Merging back: [batch*seq, 8] from a Mul of the two dims.
        let ns = b.add_node("Mul", &[&n, &s], vec![])?;
        let eight = ints(&mut b, "eight", &[8])?;
        let flat_shape = b.add_node("Concat", &[&ns, &eight], vec![attr_int("axis", 0)])?;
        let flat = b.add_node("Reshape", &[&split, &flat_shape], vec![])?;
        output(&mut b, &flat)?;
        let mut g = import(b)?;
        let inputs = random_inputs(&g, 3, &mut rng)?;
        let stats = check_pass(&ShapeFolding, &mut g, &inputs, TOL)?;
        assert_eq!(stats.notes, vec!["Reshape with constant target ×2".to_string()]);
        check_pass(&DeadNodeElimination, &mut g, &inputs, TOL)?;
        assert_eq!(g.op_histogram(), vec![("Reshape".to_string(), 2)]);
        let targets: Vec<Option<Vec<i64>>> =
            g.nodes.iter().map(|n| crate::ops::util::ints(g.constant(n.input(1)?)?).ok()).collect();
        assert_eq!(targets, vec![Some(vec![0, 0, 2, 4]), Some(vec![-1, 8])]);
        Ok(())
    }

    #[test]
    fn fully_known_shapes_become_constants() -> TestResult {
        let mut rng = Lcg::new(2);
        let mut b = GraphBuilder::new("t");
        let x = input(&mut b, "x", &[-1, 3, 4])?;
        // Shape's tail [3, 4] is fixed even though the batch is not.
        let sh = b.add_node("Shape", &[&x], vec![attr_int("start", 1)])?;
        let minus = ints(&mut b, "minus", &[-1])?;
        let shape = b.add_node("Concat", &[&minus, &sh], vec![attr_int("axis", 0)])?;
        let y = b.add_node("Reshape", &[&x, &shape], vec![])?;
        output(&mut b, &y)?;
        let mut g = import(b)?;
        let inputs = random_inputs(&g, 2, &mut rng)?;
        check_pass(&ShapeFolding, &mut g, &inputs, TOL)?;
        assert_eq!(count(&g, "Shape"), 0);
        check_pass(&super::super::ConstantFolding, &mut g, &inputs, TOL)?;
        assert_eq!(g.op_histogram(), vec![("Reshape".to_string(), 1)]);
        assert_eq!(target(&g, "Reshape"), Some(vec![-1, 3, 4]));
        Ok(())
    }

    #[test]
    fn expand_to_own_dims_uses_ones() -> TestResult {
        let mut rng = Lcg::new(3);
        let mut b = GraphBuilder::new("t");
        let x = input(&mut b, "x", &[-1, 1, 4])?;
        let n = dim_of(&mut b, &x, 0)?;
        let rest = ints(&mut b, "rest", &[3, 4])?;
        let shape = b.add_node("Concat", &[&n, &rest], vec![attr_int("axis", 0)])?;
        let y = b.add_node("Expand", &[&x, &shape], vec![])?;
        output(&mut b, &y)?;
        let mut g = import(b)?;
        let inputs = random_inputs(&g, 2, &mut rng)?;
        check_pass(&ShapeFolding, &mut g, &inputs, TOL)?;
        run_pass(&DeadNodeElimination, &mut g, &PassContext::default())?;
        assert_eq!(g.op_histogram(), vec![("Expand".to_string(), 1)]);
        assert_eq!(target(&g, "Expand"), Some(vec![1, 3, 4]));
        Ok(())
    }

    #[test]
    fn two_unknown_entries_are_left_alone() -> TestResult {
        let mut rng = Lcg::new(4);
        let mut b = GraphBuilder::new("t");
        input_dims(&mut b, "x", &[sym("batch"), sym("seq"), kiln_onnx::Dim::Fixed(2)])?;
        let n = dim_of(&mut b, "x", 0)?;
        let s = dim_of(&mut b, "x", 1)?;
        // [seq, batch, 2]: neither symbolic entry matches its position.
        let two = ints(&mut b, "two", &[2])?;
        let shape = b.add_node("Concat", &[&s, &n, &two], vec![attr_int("axis", 0)])?;
        let y = b.add_node("Reshape", &["x", &shape], vec![])?;
        output(&mut b, &y)?;
        let mut g = import(b)?;
        let inputs = random_inputs(&g, 2, &mut rng)?;
        let stats = check_pass(&ShapeFolding, &mut g, &inputs, TOL)?;
        assert_eq!(stats.rewrites, 0);
        assert_eq!(count(&g, "Concat"), 1);
        Ok(())
    }

    #[test]
    fn other_inputs_dynamic_dims_are_not_copied() -> TestResult {
        // Expand(a [N, 3], Shape(b [M, 3])): M is not N, so the target stays dynamic.
        let mut b = GraphBuilder::new("t");
        input_dims(&mut b, "a", &[sym("N"), kiln_onnx::Dim::Fixed(3)])?;
        input_dims(&mut b, "b", &[sym("M"), kiln_onnx::Dim::Fixed(3)])?;
        let shape = b.add_node("Shape", &["b"], vec![])?;
        let y = b.add_node("Expand", &["a", &shape], vec![])?;
        output(&mut b, &y)?;
        let mut g = import(b)?;
        let a = Tensor::new(vec![1, 3], TensorData::F32(vec![1.0, 2.0, 3.0]))?;
        let bb = Tensor::new(vec![4, 3], TensorData::F32(vec![0.0; 12]))?;
        let stats = check_pass(&ShapeFolding, &mut g, &[a, bb], TOL)?;
        assert_eq!(stats.rewrites, 0, "{stats:?}");
        Ok(())
    }
}
