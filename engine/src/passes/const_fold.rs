//! Constant folding: a node whose inputs are all constants is evaluated once at
//! build time with its reference implementation, and its outputs become
//! constants. Results above `fold_limit_bytes` are left to run time, so a small
//! constant feeding e.g. a huge Expand does not bloat the plan.

use std::collections::HashSet;
use std::sync::Arc;

use super::rewrite::{Tally, remove_nodes};
use super::{Pass, PassContext, PassStats};
use crate::Tensor;
use crate::graph::{Graph, GraphError, ValueType, fixed_shape};
use crate::ops::registry;

#[derive(Debug, Clone, Copy, Default)]
pub struct ConstantFolding;

impl Pass for ConstantFolding {
    fn name(&self) -> &'static str {
        "const_fold"
    }

    fn run(&self, graph: &mut Graph, cx: &PassContext) -> Result<PassStats, GraphError> {
        let reg = registry();
        let mut dead = HashSet::new();
        let mut folded = Tally::default();
        let mut notes = Vec::new();
        // In topological order, so a chain of constant nodes folds in one sweep.
        for i in 0..graph.nodes.len() {
            let node = &graph.nodes[i];
            let Some(op) = reg.get(&node.op) else { continue };
            let all_const = node.inputs.iter().flatten().all(|&v| graph.constant(v).is_some());
            if !all_const || node.outputs.is_empty() || too_big(graph, i, cx.fold_limit_bytes) {
                continue;
            }
            let inputs: Vec<Option<&Tensor>> = node.inputs.iter().map(|v| v.and_then(|v| graph.constant(v))).collect();
            let outs = match op.eval(node, &inputs) {
                Ok(outs) if outs.len() >= node.outputs.len() => outs,
                // Left in place: running it will report the same problem with its input values.
                Ok(_) => continue,
                Err(e) => {
                    notes.push(format!("{} ({}) not folded: {e}", node.name, node.op));
                    continue;
                }
            };
            if outs.iter().map(bytes).sum::<usize>() > cx.fold_limit_bytes {
                continue;
            }
            folded.add(format!("folded {}", node.op));
            let outputs = node.outputs.clone();
            for (v, t) in outputs.into_iter().zip(outs) {
                let val = &mut graph.values[v];
                val.ty = Some(ValueType::new(t.dtype(), fixed_shape(t.shape())));
                val.sym = None;
                val.constant = Some(Arc::new(t));
            }
            dead.insert(i);
        }
        remove_nodes(graph, &dead);
        let mut stats = PassStats { rewrites: dead.len(), notes: folded.notes() };
        stats.notes.extend(notes);
        Ok(stats)
    }
}

/// Whether the inferred output types already show the result over the limit.
fn too_big(graph: &Graph, node: usize, limit: usize) -> bool {
    let mut total = 0usize;
    for &o in &graph.nodes[node].outputs {
        let Some(ty) = graph.value_type(o) else { continue };
        let Some(shape) = &ty.shape else { continue };
        let Some(n) = shape.iter().try_fold(1usize, |acc, d| {
            d.as_fixed().and_then(|x| usize::try_from(x).ok()).and_then(|x| acc.checked_mul(x))
        }) else {
            continue;
        };
        total = total.saturating_add(n.saturating_mul(ty.dtype.size_of().unwrap_or(1)));
    }
    total > limit
}

fn bytes(t: &Tensor) -> usize {
    t.shape().iter().product::<usize>() * t.dtype().size_of().unwrap_or(1)
}

#[cfg(test)]
mod tests {
    use kiln_onnx::{GraphBuilder, attr_ints};

    use super::super::run_pass;
    use super::super::testing::*;
    use super::*;
    use crate::ops::util::f32s;

    /// `x · (2 · Wᵀ)` with the weight expression written out as nodes.
    fn weight_expression() -> Result<(GraphBuilder, Vec<f32>), Box<dyn std::error::Error>> {
        let mut rng = Lcg::new(1);
        let mut b = GraphBuilder::new("t");
        let x = input(&mut b, "x", &[-1, 3])?;
        let w = values(&mut b, "w", &[4, 3], &rng.vec(12))?;
        let two = values(&mut b, "two", &[], &[2.0])?;
        let t = b.add_node("Transpose", &[&w], vec![attr_ints("perm", &[1, 0])])?;
        let m = b.add_node("Mul", &[&t, &two], vec![])?;
        let y = b.add_node("MatMul", &[&x, &m], vec![])?;
        output(&mut b, &y)?;
        let mut rng = Lcg::new(1);
        let wv = rng.vec(12);
        let expected = (0..12).map(|i| 2.0 * wv[(i % 4) * 3 + i / 4]).collect();
        Ok((b, expected))
    }

    #[test]
    fn folds_constant_chains() -> TestResult {
        let (b, expected) = weight_expression()?;
        let mut g = import(b)?;
        let inputs = random_inputs(&g, 2, &mut Lcg::new(9))?;
        let stats = check_pass(&ConstantFolding, &mut g, &inputs, 1e-6)?;
        assert_eq!(g.op_histogram(), vec![("MatMul".to_string(), 1)]);
        assert_eq!(stats.rewrites, 2);
        assert_eq!(stats.notes, vec!["folded Mul ×1".to_string(), "folded Transpose ×1".into()]);
        let w = g.constant(g.nodes[0].input(1).ok_or("no weight")?).ok_or("weight not constant")?;
        assert_eq!(w.shape(), &[3, 4]);
        assert_eq!(f32s(w)?, expected.as_slice());
        Ok(())
    }

    #[test]
    fn respects_the_size_limit() -> TestResult {
        let (b, _) = weight_expression()?;
        let mut g = import(b)?;
        let cx = PassContext { fold_limit_bytes: 16, ..PassContext::default() };
        let stats = run_pass(&ConstantFolding, &mut g, &cx)?;
        assert_eq!(stats.rewrites, 0);
        assert_eq!(g.nodes.len(), 3);
        Ok(())
    }

    #[test]
    fn constant_outputs_and_integer_math() -> TestResult {
        let mut b = GraphBuilder::new("t");
        let x = input(&mut b, "x", &[2])?;
        let a = values(&mut b, "a", &[2], &[1.0, 2.0])?;
        let c = values(&mut b, "c", &[2], &[0.5, -4.0])?;
        let sum = b.add_node("Add", &[&a, &c], vec![])?;
        let relu = b.add_node("Relu", &[&sum], vec![])?;
        let i = ints(&mut b, "i", &[6, 9])?;
        let j = ints(&mut b, "j", &[4, 2])?;
        let q = b.add_node("Div", &[&i, &j], vec![])?;
        let y = b.add_node("Add", &[&x, &relu], vec![])?;
        output(&mut b, &relu)?;
        output(&mut b, &y)?;
        b.add_output(&q, kiln_onnx::DataType::Int64, &[])?;
        let mut g = import(b)?;
        let inputs = random_inputs(&g, 1, &mut Lcg::new(3))?;
        check_pass(&ConstantFolding, &mut g, &inputs, 1e-6)?;
        assert_eq!(g.op_histogram(), vec![("Add".to_string(), 1)]);
        let relu_out = g.constant(g.outputs[0]).ok_or("not folded")?;
        assert_eq!(f32s(relu_out)?, &[1.5, 0.0]);
        assert_eq!(g.value(g.outputs[0]).name, relu);
        let q_out = g.constant(g.outputs[2]).ok_or("not folded")?;
        assert_eq!(crate::ops::util::i64s(q_out)?, &[1, 4]);
        Ok(())
    }
}
