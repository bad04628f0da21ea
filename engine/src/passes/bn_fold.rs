//! BatchNorm folding. Inference BatchNormalization is a per-channel affine map
//! `y = x·s + t` with `s = scale/√(var+ε)`, `t = B − mean·s`; after a Conv, Gemm
//! or Dense with constant weights it folds into them: each output channel's
//! weights are scaled by `s` and the bias becomes `bias·s + t`.

use std::collections::HashSet;

use super::rewrite::{Index, Tally, bias_or_zeros, const_f32, new_constant, remove_nodes};
use super::{Pass, PassContext, PassStats};
use crate::Tensor;
use crate::graph::{Attr, Graph, GraphError, Node, ValueId};
use crate::ops::util::{binary_f32, f32s, tensor_f32};

#[derive(Debug, Clone, Copy, Default)]
pub struct BatchNormFold;

impl Pass for BatchNormFold {
    fn name(&self) -> &'static str {
        "bn_fold"
    }

    fn run(&self, graph: &mut Graph, cx: &PassContext) -> Result<PassStats, GraphError> {
        let _ = cx;
        let mut idx = Index::new(graph);
        let mut dead = HashSet::new();
        let mut tally = Tally::default();
        for i in 0..graph.nodes.len() {
            if graph.nodes[i].op != "BatchNormalization" {
                continue;
            }
            let Some((x, p, affine)) = foldable(graph, &idx, &dead, i) else { continue };
            let Some(fold) = fold_into(graph, p, &affine) else { continue };
            let label = format!("{}+BatchNormalization", graph.nodes[p].op);
            let bn_out = graph.nodes[i].outputs[0];
            apply(graph, p, fold);
            idx.replace_uses(graph, bn_out, x);
            dead.insert(i);
            tally.add(label);
        }
        remove_nodes(graph, &dead);
        Ok(PassStats { rewrites: dead.len(), notes: tally.notes() })
    }
}

/// Per-channel `y = x·s + t`.
struct Affine {
    s: Vec<f32>,
    t: Vec<f32>,
}

/// New inputs for the producer: weights, bias (and for Gemm, `beta` = 1).
struct Fold {
    weight: Tensor,
    bias: Tensor,
    gemm: bool,
}

/// The BN's input, its producer and the affine map, when the BN can fold.
fn foldable(graph: &Graph, idx: &Index, dead: &HashSet<usize>, i: usize) -> Option<(ValueId, usize, Affine)> {
    let bn = &graph.nodes[i];
    let x = bn.input(0)?;
    let &y = bn.outputs.first()?;
    // Extra (training) outputs must be unused: the fold only reproduces Y.
    let extra_used = bn.outputs[1..].iter().any(|&o| idx.is_output(o) || !idx.readers(o).is_empty());
    if extra_used || graph.value(y).constant.is_some() {
        return None;
    }
    let p = idx.producer(x)?;
    if dead.contains(&p) || idx.only_reader(x, dead) != Some(i) {
        return None;
    }
    let param = |k: usize| -> Option<&[f32]> { f32s(const_f32(graph, bn.input(k)?)?).ok() };
    let (scale, bias, mean, var) = (param(1)?, param(2)?, param(3)?, param(4)?);
    let c = scale.len();
    if bias.len() != c || mean.len() != c || var.len() != c {
        return None;
    }
    let eps = bn.attrs.float("epsilon", 1e-5).ok()?;
    let s: Vec<f32> = scale.iter().zip(var).map(|(g, v)| g / (v + eps).sqrt()).collect();
    let t = bias.iter().zip(mean).zip(&s).map(|((b, m), s)| b - m * s).collect();
    Some((x, p, Affine { s, t }))
}

/// The folded weights and bias for producer `p`, if it is a kind BN folds into.
fn fold_into(graph: &Graph, p: usize, a: &Affine) -> Option<Fold> {
    let node = &graph.nodes[p];
    let out_rank = graph.shape(*node.outputs.first()?)?.len();
    let w = const_f32(graph, node.input(1)?)?;
    let c = a.s.len();
    let folded_bias =
        |b: Vec<f32>| tensor_f32(vec![c], b.iter().zip(&a.s).zip(&a.t).map(|((b, s), t)| b * s + t).collect());
    match node.op.as_str() {
        "Conv" | "kiln.FusedConv" => {
            if !plain_fused(node) || node.attrs.string("layout", "NCHW").ok()? != "NCHW" || out_rank < 3 {
                return None;
            }
            if w.shape().first() != Some(&c) {
                return None;
            }
            let weight = scale_rows(w, &a.s)?;
            Some(Fold { weight, bias: folded_bias(bias_or_zeros(graph, node, 2, c)?).ok()?, gemm: false })
        }
        "kiln.Dense" => {
            if !plain_fused(node) || out_rank != 2 || w.shape().len() != 2 || w.shape()[1] != c {
                return None;
            }
            Some(Fold {
                weight: scale_cols(w, &a.s)?,
                bias: folded_bias(bias_or_zeros(graph, node, 2, c)?).ok()?,
                gemm: false,
            })
        }
        "Gemm" => {
            let trans_b = node.attrs.int("transB", 0).ok()? != 0;
            if w.shape().len() != 2 {
                return None;
            }
            let weight = if trans_b {
                (w.shape()[0] == c).then(|| scale_rows(w, &a.s))??
            } else {
                (w.shape()[1] == c).then(|| scale_cols(w, &a.s))??
            };
            // y = α·A·B + β·C, so the new C (with β = 1) is β·C·s + t.
            let beta = node.attrs.float("beta", 1.0).ok()?;
            let s = tensor_f32(vec![c], a.s.clone()).ok()?;
            let t = tensor_f32(vec![c], a.t.clone()).ok()?;
            let bias = match node.input(2) {
                None => t,
                Some(v) => {
                    let scaled = binary_f32(const_f32(graph, v)?, &s, |x, s| beta * x * s).ok()?;
                    binary_f32(&scaled, &t, |x, t| x + t).ok()?
                }
            };
            Some(Fold { weight, bias, gemm: true })
        }
        _ => None,
    }
}

/// A Conv, or a fused op that has not taken an activation or residual yet.
fn plain_fused(node: &Node) -> bool {
    node.input(3).is_none() && node.attrs.string("activation", "none").is_ok_and(|a| a == "none")
}

/// Each leading-axis slice scaled by its factor (Conv `[M, …]`, Gemm `Bᵀ [N, K]`).
fn scale_rows(w: &Tensor, s: &[f32]) -> Option<Tensor> {
    let data = f32s(w).ok()?;
    let row = data.len() / s.len().max(1);
    let out = data.chunks(row.max(1)).zip(s).flat_map(|(r, &f)| r.iter().map(move |x| x * f)).collect();
    tensor_f32(w.shape().to_vec(), out).ok()
}

/// Each column of a 2-D `[K, N]` matrix scaled by its factor.
fn scale_cols(w: &Tensor, s: &[f32]) -> Option<Tensor> {
    let data = f32s(w).ok()?;
    let n = s.len();
    let out = data.iter().enumerate().map(|(i, x)| x * s[i % n]).collect();
    tensor_f32(w.shape().to_vec(), out).ok()
}

fn apply(graph: &mut Graph, p: usize, fold: Fold) {
    let name = graph.nodes[p].name.clone();
    let w = new_constant(graph, &format!("{name}_bn_weight"), fold.weight);
    let b = new_constant(graph, &format!("{name}_bn_bias"), fold.bias);
    let node = &mut graph.nodes[p];
    node.inputs[1] = Some(w);
    if node.inputs.len() < 3 {
        node.inputs.resize(3, None);
    }
    node.inputs[2] = Some(b);
    if fold.gemm {
        node.attrs.insert("beta", Attr::Float(1.0));
    }
}

#[cfg(test)]
mod tests {
    use kiln_onnx::{GraphBuilder, attr_int};

    use super::super::testing::*;
    use super::*;

    const TOL: f32 = 1e-5;

    #[test]
    fn folds_into_conv_with_and_without_bias() -> TestResult {
        for bias in [false, true] {
            let mut rng = Lcg::new(1);
            let mut b = GraphBuilder::new("t");
            let x = input(&mut b, "x", &[-1, 3, 7, 7])?;
            let c = conv(&mut b, &mut rng, &x, 3, 4, 3, 1, 1, 1, bias)?;
            let y = batch_norm(&mut b, &mut rng, &c, 4)?;
            output(&mut b, &y)?;
            let mut g = import(b)?;
            let inputs = random_inputs(&g, 2, &mut rng)?;
            let stats = check_pass(&BatchNormFold, &mut g, &inputs, TOL)?;
            assert_eq!(count(&g, "BatchNormalization"), 0);
            assert_eq!(count(&g, "Conv"), 1);
            assert_eq!(g.nodes[0].inputs.len(), 3, "the conv gained a bias");
            assert_eq!(stats.rewrites, 1);
            assert_eq!(stats.notes, vec!["Conv+BatchNormalization ×1".to_string()]);
            assert_eq!(g.value(g.outputs[0]).name, y, "the graph output keeps its name");
        }
        Ok(())
    }

    #[test]
    fn folds_into_gemm_with_trans_b_and_c() -> TestResult {
        for (trans_b, with_c) in [(0, false), (1, true), (0, true), (1, false)] {
            let mut rng = Lcg::new(2);
            let mut b = GraphBuilder::new("t");
            let x = input(&mut b, "x", &[-1, 5])?;
            let w = weight(&mut b, &mut rng, "w", if trans_b == 1 { &[6, 5] } else { &[5, 6] })?;
            let mut ins = vec![x, w];
            if with_c {
                ins.push(weight(&mut b, &mut rng, "c", &[1, 6])?);
            }
            let refs: Vec<&str> = ins.iter().map(String::as_str).collect();
            let attrs = vec![attr_int("transB", trans_b), kiln_onnx::attr_float("beta", 0.5)];
            let gm = b.add_node("Gemm", &refs, attrs)?;
            let y = batch_norm(&mut b, &mut rng, &gm, 6)?;
            output(&mut b, &y)?;
            let mut g = import(b)?;
            let inputs = random_inputs(&g, 3, &mut rng)?;
            check_pass(&BatchNormFold, &mut g, &inputs, TOL)?;
            assert_eq!(count(&g, "BatchNormalization"), 0, "transB={trans_b} C={with_c}");
            assert_eq!(count(&g, "Gemm"), 1);
        }
        Ok(())
    }

    #[test]
    fn folds_into_plain_dense_only() -> TestResult {
        for activation in ["none", "relu"] {
            let mut rng = Lcg::new(3);
            let mut b = GraphBuilder::new("t");
            let x = input(&mut b, "x", &[-1, 5])?;
            let w = weight(&mut b, &mut rng, "w", &[5, 6])?;
            let d = b.add_node("MatMul", &[&x, &w], vec![])?;
            let y = batch_norm(&mut b, &mut rng, &d, 6)?;
            output(&mut b, &y)?;
            let mut g = import(b)?;
            // Turn the MatMul into a Dense by hand, as dense fusion would.
            g.nodes[0].op = "kiln.Dense".into();
            g.nodes[0].attrs.insert("activation", Attr::String(activation.into()));
            crate::infer::infer_shapes(&mut g)?;
            let inputs = random_inputs(&g, 3, &mut rng)?;
            check_pass(&BatchNormFold, &mut g, &inputs, TOL)?;
            let expected = usize::from(activation != "none");
            assert_eq!(count(&g, "BatchNormalization"), expected, "activation {activation}");
        }
        Ok(())
    }

    #[test]
    fn leaves_shared_or_unsupported_producers_alone() -> TestResult {
        let mut rng = Lcg::new(4);
        let mut b = GraphBuilder::new("t");
        let x = input(&mut b, "x", &[-1, 3, 5, 5])?;
        // The conv output is also a graph output: folding would change it.
        let c = conv(&mut b, &mut rng, &x, 3, 3, 1, 1, 0, 1, true)?;
        let y = batch_norm(&mut b, &mut rng, &c, 3)?;
        // A BN after a Relu has nothing to fold into.
        let r = b.add_node("Relu", &[&y], vec![])?;
        let z = batch_norm(&mut b, &mut rng, &r, 3)?;
        output(&mut b, &c)?;
        output(&mut b, &z)?;
        let mut g = import(b)?;
        let inputs = random_inputs(&g, 2, &mut rng)?;
        let stats = check_pass(&BatchNormFold, &mut g, &inputs, TOL)?;
        assert_eq!(count(&g, "BatchNormalization"), 2);
        assert_eq!(stats.rewrites, 0);
        Ok(())
    }

    #[test]
    fn random_conv_batch_norm_chains_fold_exactly() -> TestResult {
        for seed in 0..12 {
            let mut rng = Lcg::new(100 + seed);
            let mut b = GraphBuilder::new("t");
            let mut ch = 1 + rng.below(4) as i64;
            let size = 5 + rng.below(6) as i64;
            let mut x = input(&mut b, "x", &[-1, ch, size, size])?;
            let layers = 1 + rng.below(3);
            for _ in 0..layers {
                let group = if rng.below(3) == 0 { ch } else { 1 };
                let cout = group * (1 + rng.below(3) as i64);
                let k = [1, 3][rng.below(2)];
                let (stride, pad, bias) = (1 + rng.below(2) as i64, rng.below(2) as i64, rng.below(2) == 0);
                let c = conv(&mut b, &mut rng, &x, ch, cout, k, stride, pad, group, bias)?;
                x = batch_norm(&mut b, &mut rng, &c, cout)?;
                if rng.below(2) == 0 {
                    x = b.add_node("Relu", &[&x], vec![])?;
                }
                ch = cout;
            }
            output(&mut b, &x)?;
            let mut g = import(b)?;
            let inputs = random_inputs(&g, 2, &mut rng)?;
            let stats = check_pass(&BatchNormFold, &mut g, &inputs, TOL).map_err(|e| format!("seed {seed}: {e}"))?;
            assert_eq!(count(&g, "BatchNormalization"), 0, "seed {seed}");
            assert_eq!(stats.rewrites, layers);
        }
        Ok(())
    }
}
