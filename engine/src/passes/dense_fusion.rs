//! Dense fusion. MatMul by a constant 2-D matrix and Gemm (no `transA`, constant
//! B, C absent or a constant row) become `kiln.Dense` with `W [K, N]` (Gemm's
//! `transB` and `alpha` folded into a new W, `beta·C` into the bias); then the
//! chain after it is absorbed while each link has exactly one reader: constant
//! `[N]` Adds into the bias, one Add of a tensor broadcastable to the output into
//! `Z`, and a final Relu / Gelu / Tanh / Sigmoid / Clip.

use std::collections::HashSet;

use super::rewrite::{Epilogue, Index, absorb_epilogue, const_f32, fuse_in_place, is_f32, new_constant, per_channel};
use super::{Pass, PassContext, PassStats};
use crate::Tensor;
use crate::graph::{Attr, Attrs, Dim, Graph, GraphError, ValueId};
use crate::ops::util::{f32s, tensor_f32};

#[derive(Debug, Clone, Copy, Default)]
pub struct DenseFusion;

const ACTIVATIONS: &[&str] = &["relu", "gelu", "gelu_tanh", "tanh", "sigmoid", "clip"];

impl Pass for DenseFusion {
    fn name(&self) -> &'static str {
        "dense_fusion"
    }

    fn run(&self, graph: &mut Graph, cx: &PassContext) -> Result<PassStats, GraphError> {
        let _ = cx;
        let head = |graph: &mut Graph, i: usize| match graph.nodes[i].op.as_str() {
            "MatMul" => from_matmul(graph, i).then_some(("MatMul", true)),
            "Gemm" => from_gemm(graph, i).then_some(("Gemm", true)),
            "kiln.Dense" => Some(("Dense", false)),
            _ => None,
        };
        fuse_in_place(graph, head, absorb)
    }
}

fn dense_attrs() -> Attrs {
    let mut a = Attrs::new();
    a.insert("activation", Attr::String("none".into()));
    a
}

/// MatMul(A, W) with W a constant FP32 matrix → Dense(A, W).
fn from_matmul(graph: &mut Graph, i: usize) -> bool {
    let node = &graph.nodes[i];
    let (Some(a), Some(w)) = (node.input(0), node.input(1)) else { return false };
    let Some(wt) = const_f32(graph, w) else { return false };
    let a_rank = graph.shape(a).map_or(0, Vec::len);
    if wt.shape().len() != 2 || a_rank == 0 || !is_f32(graph, a) {
        return false;
    }
    let node = &mut graph.nodes[i];
    node.op = "kiln.Dense".into();
    node.attrs = dense_attrs();
    node.inputs.truncate(2);
    true
}

/// Gemm(A, B, C) → Dense(A, W, bias) when it is a plain linear layer.
fn from_gemm(graph: &mut Graph, i: usize) -> bool {
    let node = &graph.nodes[i];
    let attr_int = |n: &str| node.attrs.int(n, 0).unwrap_or(-1);
    let (alpha, beta) = (node.attrs.float("alpha", 1.0), node.attrs.float("beta", 1.0));
    let (Ok(alpha), Ok(beta)) = (alpha, beta) else { return false };
    let (trans_a, trans_b) = (attr_int("transA"), attr_int("transB"));
    let (Some(a), Some(b)) = (node.input(0), node.input(1)) else { return false };
    let Some(bt) = const_f32(graph, b) else { return false };
    if trans_a != 0 || !(trans_b == 0 || trans_b == 1) || bt.shape().len() != 2 || graph.shape(a).is_none() {
        return false;
    }
    let n = bt.shape()[1 - trans_b as usize];
    let bias = match node.input(2) {
        None => None,
        Some(c) => match const_f32(graph, c).and_then(|t| per_channel(t, 2, 1, n)) {
            Some(v) => Some(v.into_iter().map(|x| x * beta).collect::<Vec<f32>>()),
            None => return false,
        },
    };
    let Some(weight) = gemm_weight(bt, trans_b == 1, alpha) else { return false };
    let name = node.name.clone();
    let w = match weight {
        Some(t) => new_constant(graph, &format!("{name}_weight"), t),
        None => b,
    };
    let mut inputs = vec![Some(a), Some(w)];
    if let Some(bias) = bias {
        let Ok(t) = tensor_f32(vec![n], bias) else { return false };
        inputs.push(Some(new_constant(graph, &format!("{name}_bias"), t)));
    }
    let node = &mut graph.nodes[i];
    node.op = "kiln.Dense".into();
    node.attrs = dense_attrs();
    node.inputs = inputs;
    true
}

/// Gemm's B as Dense's `W [K, N]`: `Some(None)` when B can be used as it is.
fn gemm_weight(b: &Tensor, trans: bool, alpha: f32) -> Option<Option<Tensor>> {
    if !trans && alpha == 1.0 {
        return Some(None);
    }
    let (rows, cols) = (b.shape()[0], b.shape()[1]);
    let data = f32s(b).ok()?;
    let (k, n) = if trans { (cols, rows) } else { (rows, cols) };
    let mut out = vec![0.0; data.len()];
    for r in 0..k {
        for c in 0..n {
            let src = if trans { c * cols + r } else { r * cols + c };
            out[r * n + c] = alpha * data[src];
        }
    }
    tensor_f32(vec![k, n], out).ok().map(Some)
}

/// Absorbs the chain after Dense `i`; returns the labels of what it took.
fn absorb(
    graph: &mut Graph,
    idx: &Index,
    dead: &mut HashSet<usize>,
    i: usize,
) -> Result<Vec<&'static str>, GraphError> {
    let node = &graph.nodes[i];
    let (Some(&start), Some(w)) = (node.outputs.first(), node.input(1)) else { return Ok(Vec::new()) };
    if node.attrs.string("activation", "none").ok().as_deref() != Some("none") {
        return Ok(Vec::new());
    }
    let Some(out_shape) = graph.shape(start).cloned() else { return Ok(Vec::new()) };
    let Some(n) = graph.shape(w).and_then(|s| s.get(1)).and_then(Dim::as_fixed).map(|n| n as usize) else {
        return Ok(Vec::new());
    };
    let rank = out_shape.len().max(1);
    // Any tensor that broadcasts into the output is a residual, a constant
    // that is no `[N]` row included (e.g. position embeddings).
    let residual = |g: &Graph, _out: ValueId, z: ValueId| fits(g, z, &out_shape);
    let epilogue =
        Epilogue { activations: ACTIVATIONS, channels: n, bias_axis: Some((rank, rank - 1)), residual: &residual };
    absorb_epilogue(graph, idx, dead, i, &epilogue)
}

/// Whether adding `z` leaves the output shape as it is (z broadcasts into it).
fn fits(graph: &Graph, z: ValueId, out: &[Dim]) -> bool {
    let Some(ty) = graph.value_type(z) else { return false };
    let Some(shape) = &ty.shape else { return false };
    if ty.dtype != crate::DType::F32 || shape.len() > out.len() {
        return false;
    }
    let offset = out.len() - shape.len();
    shape.iter().enumerate().all(|(j, d)| *d == out[j + offset] || d.as_fixed() == Some(1))
}

#[cfg(test)]
mod tests {
    use kiln_onnx::{GraphBuilder, attr_float, attr_int, attr_string};

    use super::super::testing::*;
    use super::*;

    const TOL: f32 = 1e-5;

    fn activation(g: &Graph, i: usize) -> Option<&Attr> {
        g.nodes[i].attrs.get("activation")
    }

    #[test]
    fn matmul_bias_residual_gelu() -> TestResult {
        for approximate in ["none", "tanh"] {
            let mut rng = Lcg::new(1);
            let mut b = GraphBuilder::new("t");
            let x = input(&mut b, "x", &[-1, 3, 8])?;
            let w = weight(&mut b, &mut rng, "w", &[8, 4])?;
            let bias = weight(&mut b, &mut rng, "bias", &[4])?;
            let res = input(&mut b, "res", &[-1, 3, 4])?;
            let m = b.add_node("MatMul", &[&x, &w], vec![])?;
            let a = b.add_node("Add", &[&m, &bias], vec![])?;
            let s = b.add_node("Add", &[&res, &a], vec![])?;
            let y = b.add_node("Gelu", &[&s], vec![attr_string("approximate", approximate)])?;
            output(&mut b, &y)?;
            let mut g = import(b)?;
            let inputs = random_inputs(&g, 2, &mut rng)?;
            let stats = check_pass(&DenseFusion, &mut g, &inputs, TOL)?;
            assert_eq!(g.nodes.len(), 1, "{:?}", g.op_histogram());
            assert_eq!(g.nodes[0].op, "kiln.Dense");
            let name = if approximate == "none" { "gelu" } else { "gelu_tanh" };
            assert_eq!(activation(&g, 0), Some(&Attr::String(name.into())));
            assert_eq!(g.nodes[0].input(3), Some(g.inputs[1]));
            assert_eq!(stats.notes, vec!["MatMul+Bias+Add+Gelu ×1".to_string()]);
        }
        Ok(())
    }

    #[test]
    fn gemm_flags_fold_into_weights_and_bias() -> TestResult {
        for (trans_b, c_shape) in [(1, Some(&[1, 5][..])), (0, Some(&[5][..])), (1, None), (0, Some(&[][..]))] {
            let mut rng = Lcg::new(2);
            let mut b = GraphBuilder::new("t");
            let x = input(&mut b, "x", &[-1, 6])?;
            let w = weight(&mut b, &mut rng, "w", if trans_b == 1 { &[5, 6] } else { &[6, 5] })?;
            let mut ins = vec![x, w];
            if let Some(shape) = c_shape {
                ins.push(weight(&mut b, &mut rng, "c", shape)?);
            }
            let refs: Vec<&str> = ins.iter().map(String::as_str).collect();
            let attrs = vec![attr_int("transB", trans_b), attr_float("alpha", 0.75), attr_float("beta", -1.5)];
            let gm = b.add_node("Gemm", &refs, attrs)?;
            let y = b.add_node("Relu", &[&gm], vec![])?;
            output(&mut b, &y)?;
            let mut g = import(b)?;
            let inputs = random_inputs(&g, 3, &mut rng)?;
            check_pass(&DenseFusion, &mut g, &inputs, TOL)
                .map_err(|e| format!("transB {trans_b} C {c_shape:?}: {e}"))?;
            assert_eq!(g.op_histogram(), vec![("kiln.Dense".to_string(), 1)]);
            assert_eq!(activation(&g, 0), Some(&Attr::String("relu".into())));
            assert_eq!(g.shape(g.nodes[0].input(1).unwrap_or_default()).map(Vec::len), Some(2));
        }
        Ok(())
    }

    #[test]
    fn other_activations_and_constant_residual() -> TestResult {
        for act in ["Relu", "Tanh", "Sigmoid", "Clip"] {
            let mut rng = Lcg::new(3);
            let mut b = GraphBuilder::new("t");
            let x = input(&mut b, "x", &[-1, 4, 6])?;
            let w = weight(&mut b, &mut rng, "w", &[6, 3])?;
            let pos = weight(&mut b, &mut rng, "pos", &[4, 3])?;
            let m = b.add_node("MatMul", &[&x, &w], vec![])?;
            let s = b.add_node("Add", &[&m, &pos], vec![])?;
            let y = if act == "Clip" {
                let lo = values(&mut b, "lo", &[], &[-0.3])?;
                let hi = values(&mut b, "hi", &[], &[0.4])?;
                b.add_node("Clip", &[&s, &lo, &hi], vec![])?
            } else {
                b.add_node(act, &[&s], vec![])?
            };
            output(&mut b, &y)?;
            let mut g = import(b)?;
            let inputs = random_inputs(&g, 2, &mut rng)?;
            check_pass(&DenseFusion, &mut g, &inputs, TOL).map_err(|e| format!("{act}: {e}"))?;
            assert_eq!(g.nodes.len(), 1, "{act}");
            assert_eq!(activation(&g, 0), Some(&Attr::String(act.to_lowercase())));
            assert!(g.nodes[0].input(3).is_some(), "the [4, 3] constant is a residual, not a bias");
        }
        Ok(())
    }

    #[test]
    fn unsupported_forms_are_left_alone() -> TestResult {
        let mut rng = Lcg::new(4);
        let mut b = GraphBuilder::new("t");
        let x = input(&mut b, "x", &[3, 4])?;
        let v = input(&mut b, "v", &[4, 2])?;
        // Non-constant right operand.
        let m = b.add_node("MatMul", &[&x, &v], vec![])?;
        // transA.
        let wa = weight(&mut b, &mut rng, "wa", &[3, 2])?;
        let ga = b.add_node("Gemm", &[&x, &wa], vec![attr_int("transA", 1)])?;
        // A full-matrix C.
        let wc = weight(&mut b, &mut rng, "wc", &[4, 2])?;
        let c = weight(&mut b, &mut rng, "c", &[3, 2])?;
        let gc = b.add_node("Gemm", &[&x, &wc, &c], vec![])?;
        // A constant matmul whose result is also a graph output: converted, its Relu kept.
        let wd = weight(&mut b, &mut rng, "wd", &[4, 2])?;
        let d = b.add_node("MatMul", &[&x, &wd], vec![])?;
        let r = b.add_node("Relu", &[&d], vec![])?;
        for o in [&m, &ga, &gc, &d, &r] {
            output(&mut b, o)?;
        }
        let mut g = import(b)?;
        let inputs = random_inputs(&g, 1, &mut rng)?;
        let stats = check_pass(&DenseFusion, &mut g, &inputs, TOL)?;
        assert_eq!(count(&g, "MatMul"), 1);
        assert_eq!(count(&g, "Gemm"), 2);
        assert_eq!(count(&g, "kiln.Dense"), 1);
        assert_eq!(count(&g, "Relu"), 1);
        assert_eq!(stats.notes, vec!["MatMul ×1".to_string()]);
        Ok(())
    }

    #[test]
    fn random_mlps_fuse_and_match() -> TestResult {
        for seed in 0..12 {
            let mut rng = Lcg::new(500 + seed);
            let mut b = GraphBuilder::new("t");
            let rank = 2 + rng.below(2);
            let mut k = 1 + rng.below(6) as i64;
            let lead: Vec<i64> = if rank == 2 { vec![-1] } else { vec![-1, 3] };
            let shape = |n: i64| lead.iter().copied().chain([n]).collect::<Vec<i64>>();
            let mut x = input(&mut b, "x", &shape(k))?;
            let layers = 1 + rng.below(3);
            for _ in 0..layers {
                let n = if rng.below(2) == 0 { k } else { 1 + rng.below(6) as i64 };
                let w = weight(&mut b, &mut rng, "w", &[k, n])?;
                let mut h = b.add_node("MatMul", &[&x, &w], vec![])?;
                if rng.below(2) == 0 {
                    let shapes: [&[i64]; 2] = [&[n], &[1, n]];
                    let shape = shapes[rng.below(2)];
                    let bias = weight(&mut b, &mut rng, "bias", shape)?;
                    h = b.add_node("Add", &[&bias, &h], vec![])?;
                }
                if n == k && rng.below(2) == 0 {
                    h = b.add_node("Add", &[&h, &x], vec![])?;
                }
                h = match rng.below(4) {
                    0 => h,
                    1 => b.add_node("Relu", &[&h], vec![])?,
                    2 => b.add_node("Tanh", &[&h], vec![])?,
                    _ => b.add_node("Gelu", &[&h], vec![])?,
                };
                x = h;
                k = n;
            }
            output(&mut b, &x)?;
            let mut g = import(b)?;
            let inputs = random_inputs(&g, 2, &mut rng)?;
            check_pass(&DenseFusion, &mut g, &inputs, TOL).map_err(|e| format!("seed {seed}: {e}"))?;
            assert_eq!(g.nodes.len(), layers, "seed {seed}: {:?}", g.op_histogram());
            assert_eq!(count(&g, "kiln.Dense"), layers, "seed {seed}");
        }
        Ok(())
    }
}
