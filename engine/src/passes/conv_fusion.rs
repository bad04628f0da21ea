//! Convolution fusion. Every Conv becomes a `kiln.FusedConv` (the one conv op
//! device builders implement), with `auto_pad` resolved to explicit pads where
//! the input size is known; then the chain after it is absorbed while each link
//! has exactly one reader: per-channel constant Adds into the bias, one residual
//! Add into input `Z`, and a final Relu / Clip / Sigmoid / x·Sigmoid(x).

use std::collections::HashSet;

use super::rewrite::{Epilogue, Index, absorb_epilogue, fuse_in_place};
use super::{Pass, PassContext, PassStats};
use crate::graph::{Attr, Graph, GraphError, Node, ValueId};

#[derive(Debug, Clone, Copy, Default)]
pub struct ConvFusion;

const ACTIVATIONS: &[&str] = &["relu", "clip", "sigmoid", "silu"];

impl Pass for ConvFusion {
    fn name(&self) -> &'static str {
        "conv_fusion"
    }

    fn run(&self, graph: &mut Graph, cx: &PassContext) -> Result<PassStats, GraphError> {
        let _ = cx;
        let head = |graph: &mut Graph, i: usize| match graph.nodes[i].op.as_str() {
            "Conv" => {
                to_fused(graph, i);
                Some(("Conv", true))
            }
            "kiln.FusedConv" => Some(("FusedConv", false)),
            _ => None,
        };
        fuse_in_place(graph, head, absorb)
    }
}

/// Conv → kiln.FusedConv with no activation yet; `auto_pad` made explicit when possible.
fn to_fused(graph: &mut Graph, i: usize) {
    let pads = explicit_pads(graph, &graph.nodes[i]);
    let node = &mut graph.nodes[i];
    node.op = "kiln.FusedConv".into();
    node.attrs.insert("activation", Attr::String("none".into()));
    if let Some(pads) = pads {
        node.attrs.remove("auto_pad");
        node.attrs.insert("pads", Attr::Ints(pads));
    }
}

/// ONNX `auto_pad` as `pads` [begins…, ends…]; `None` to leave the node as is.
fn explicit_pads(graph: &Graph, node: &Node) -> Option<Vec<i64>> {
    let mode = node.attrs.string("auto_pad", "NOTSET").ok()?;
    if mode == "NOTSET" || mode.is_empty() {
        return None;
    }
    let w = graph.shape(node.input(1)?)?;
    let kernel: Vec<i64> = match node.attrs.ints("kernel_shape").ok()? {
        Some(k) => k.to_vec(),
        None => w.get(2..)?.iter().map(|d| d.as_fixed()).collect::<Option<_>>()?,
    };
    let n = kernel.len();
    if mode == "VALID" {
        return Some(vec![0; 2 * n]);
    }
    let x = graph.shape(node.input(0)?)?;
    let spatial: Vec<i64> = x.get(2..)?.iter().map(|d| d.as_fixed()).collect::<Option<_>>()?;
    let ones = vec![1; n];
    let strides = node.attrs.ints("strides").ok()?.map_or(ones.clone(), <[i64]>::to_vec);
    let dilations = node.attrs.ints("dilations").ok()?.map_or(ones, <[i64]>::to_vec);
    if spatial.len() != n || strides.len() != n || dilations.len() != n || strides.iter().any(|&s| s < 1) {
        return None;
    }
    let mut pads = vec![0; 2 * n];
    for a in 0..n {
        let out = (spatial[a] + strides[a] - 1) / strides[a];
        let total = ((out - 1) * strides[a] + (kernel[a] - 1) * dilations[a] + 1 - spatial[a]).max(0);
        let (begin, end) = match mode.as_str() {
            "SAME_UPPER" => (total / 2, total - total / 2),
            "SAME_LOWER" => (total - total / 2, total / 2),
            _ => return None,
        };
        pads[a] = begin;
        pads[a + n] = end;
    }
    Some(pads)
}

/// Absorbs the chain after FusedConv `i`; returns the labels of what it took.
fn absorb(
    graph: &mut Graph,
    idx: &Index,
    dead: &mut HashSet<usize>,
    i: usize,
) -> Result<Vec<&'static str>, GraphError> {
    let node = &graph.nodes[i];
    let (Some(&start), Some(w)) = (node.outputs.first(), node.input(1)) else { return Ok(Vec::new()) };
    if node.attrs.string("activation", "none").map_err(|e| invalid(node, e))? != "none" {
        return Ok(Vec::new());
    }
    let nhwc = node.attrs.string("layout", "NCHW").map_err(|e| invalid(node, e))? == "NHWC";
    let Some(rank) = graph.shape(start).map(Vec::len) else { return Ok(Vec::new()) };
    let channels = match graph.shape(w).and_then(|s| s.first()).and_then(|d| d.as_fixed()) {
        Some(m) => m as usize,
        None => return Ok(Vec::new()),
    };
    let epilogue = Epilogue {
        activations: ACTIVATIONS,
        channels,
        // A [1, C, 1, 1]-like constant is a bias; in NHWC the channel axis moved.
        bias_axis: (!nhwc).then_some((rank, 1)),
        residual: &residual,
    };
    absorb_epilogue(graph, idx, dead, i, &epilogue)
}

/// A residual must be a computed value of exactly the conv output's type (no
/// broadcasting); a constant that is not a bias stops the chain.
fn residual(graph: &Graph, out: ValueId, z: ValueId) -> bool {
    if graph.constant(z).is_some() {
        return false;
    }
    match (graph.value_type(out), graph.value_type(z)) {
        (Some(x), Some(y)) => x.shape.is_some() && x == y,
        _ => false,
    }
}

fn invalid(node: &Node, reason: String) -> GraphError {
    GraphError::Invalid(format!("{} ({}): {reason}", node.name, node.op))
}

#[cfg(test)]
mod tests {
    use kiln_onnx::{GraphBuilder, attr_ints, attr_string};

    use super::super::testing::*;
    use super::super::{BatchNormFold, PassContext, run_pass};
    use super::*;

    const TOL: f32 = 1e-5;

    fn attr<'a>(g: &'a Graph, i: usize, name: &str) -> Option<&'a Attr> {
        g.nodes[i].attrs.get(name)
    }

    #[test]
    fn conv_bias_residual_relu_becomes_one_node() -> TestResult {
        let mut rng = Lcg::new(1);
        let mut b = GraphBuilder::new("t");
        let x = input(&mut b, "x", &[-1, 4, 6, 6])?;
        let c = conv(&mut b, &mut rng, &x, 4, 4, 3, 1, 1, 1, false)?;
        let bias = weight(&mut b, &mut rng, "bias", &[1, 4, 1, 1])?;
        let a = b.add_node("Add", &[&bias, &c], vec![])?;
        let s = b.add_node("Add", &[&a, &x], vec![])?;
        let y = b.add_node("Relu", &[&s], vec![])?;
        output(&mut b, &y)?;
        let mut g = import(b)?;
        let inputs = random_inputs(&g, 2, &mut rng)?;
        let stats = check_pass(&ConvFusion, &mut g, &inputs, TOL)?;
        assert_eq!(g.nodes.len(), 1);
        assert_eq!(g.nodes[0].op, "kiln.FusedConv");
        assert_eq!(attr(&g, 0, "activation"), Some(&Attr::String("relu".into())));
        assert_eq!(g.nodes[0].inputs.len(), 4, "bias and residual inputs");
        assert_eq!(g.nodes[0].input(3), Some(g.inputs[0]));
        assert_eq!(stats.notes, vec!["Conv+Bias+Add+Relu ×1".to_string()]);
        assert_eq!(g.value(g.outputs[0]).name, y);
        Ok(())
    }

    #[test]
    fn clip_sigmoid_and_silu_activations() -> TestResult {
        for act in ["clip", "clip_attr_less", "sigmoid", "silu", "silu_swapped"] {
            let mut rng = Lcg::new(2);
            let mut b = GraphBuilder::new("t");
            let x = input(&mut b, "x", &[-1, 2, 5, 5])?;
            let c = conv(&mut b, &mut rng, &x, 2, 3, 3, 2, 1, 1, true)?;
            let y = match act {
                "clip" => {
                    let lo = values(&mut b, "lo", &[], &[0.0])?;
                    let hi = values(&mut b, "hi", &[], &[0.5])?;
                    b.add_node("Clip", &[&c, &lo, &hi], vec![])?
                }
                "clip_attr_less" => {
                    let lo = values(&mut b, "lo", &[], &[-0.25])?;
                    b.add_node("Clip", &[&c, &lo], vec![])?
                }
                "sigmoid" => b.add_node("Sigmoid", &[&c], vec![])?,
                _ => {
                    let s = b.add_node("Sigmoid", &[&c], vec![])?;
                    if act == "silu" {
                        b.add_node("Mul", &[&c, &s], vec![])?
                    } else {
                        b.add_node("Mul", &[&s, &c], vec![])?
                    }
                }
            };
            output(&mut b, &y)?;
            let mut g = import(b)?;
            let inputs = random_inputs(&g, 2, &mut rng)?;
            check_pass(&ConvFusion, &mut g, &inputs, TOL).map_err(|e| format!("{act}: {e}"))?;
            assert_eq!(g.nodes.len(), 1, "{act}");
            let name = act.split('_').next().unwrap_or_default();
            assert_eq!(attr(&g, 0, "activation"), Some(&Attr::String(name.into())), "{act}");
            if act == "clip" {
                assert_eq!(attr(&g, 0, "clip_max"), Some(&Attr::Float(0.5)));
            }
        }
        Ok(())
    }

    #[test]
    fn shared_intermediates_stop_the_fusion() -> TestResult {
        let mut rng = Lcg::new(3);
        let mut b = GraphBuilder::new("t");
        let x = input(&mut b, "x", &[-1, 2, 4, 4])?;
        // Conv output read twice: converted, nothing absorbed.
        let c = conv(&mut b, &mut rng, &x, 2, 2, 1, 1, 0, 1, true)?;
        let r1 = b.add_node("Relu", &[&c], vec![])?;
        let r2 = b.add_node("Sigmoid", &[&c], vec![])?;
        // Relu after a graph output: the output must stay observable.
        let c2 = conv(&mut b, &mut rng, &x, 2, 2, 1, 1, 0, 1, false)?;
        let r3 = b.add_node("Relu", &[&c2], vec![])?;
        // A broadcasting Add is not a residual.
        let c3 = conv(&mut b, &mut rng, &x, 2, 1, 1, 1, 0, 1, false)?;
        let wide = input(&mut b, "wide", &[-1, 2, 4, 4])?;
        let r4 = b.add_node("Add", &[&c3, &wide], vec![])?;
        for o in [&r1, &r2, &c2, &r3, &r4] {
            output(&mut b, o)?;
        }
        let mut g = import(b)?;
        let inputs = random_inputs(&g, 2, &mut rng)?;
        let stats = check_pass(&ConvFusion, &mut g, &inputs, TOL)?;
        assert_eq!(count(&g, "kiln.FusedConv"), 3);
        assert_eq!(count(&g, "Relu"), 2);
        assert_eq!(count(&g, "Add"), 1);
        assert_eq!(stats.notes, vec!["Conv ×3".to_string()]);
        Ok(())
    }

    #[test]
    fn auto_pad_becomes_explicit_pads() -> TestResult {
        for (mode, stride, size) in [("SAME_UPPER", 2, 7), ("SAME_LOWER", 2, 6), ("SAME_UPPER", 1, 5), ("VALID", 2, 7)]
        {
            let mut rng = Lcg::new(4);
            let mut b = GraphBuilder::new("t");
            let x = input(&mut b, "x", &[-1, 2, size, size])?;
            let w = weight(&mut b, &mut rng, "w", &[3, 2, 4, 4])?;
            let attrs = vec![attr_string("auto_pad", mode), attr_ints("strides", &[stride, stride])];
            let y = b.add_node("Conv", &[&x, &w], attrs)?;
            output(&mut b, &y)?;
            let mut g = import(b)?;
            let inputs = random_inputs(&g, 1, &mut rng)?;
            check_pass(&ConvFusion, &mut g, &inputs, TOL).map_err(|e| format!("{mode}: {e}"))?;
            assert!(attr(&g, 0, "auto_pad").is_none(), "{mode}");
            assert!(matches!(attr(&g, 0, "pads"), Some(Attr::Ints(p)) if p.len() == 4), "{mode}");
        }
        // Unknown spatial size: SAME stays symbolic.
        let mut rng = Lcg::new(5);
        let mut b = GraphBuilder::new("t");
        let x = input(&mut b, "x", &[1, 2, -1, -1])?;
        let w = weight(&mut b, &mut rng, "w", &[3, 2, 3, 3])?;
        let y = b.add_node("Conv", &[&x, &w], vec![attr_string("auto_pad", "SAME_UPPER")])?;
        output(&mut b, &y)?;
        let mut g = import(b)?;
        run_pass(&ConvFusion, &mut g, &PassContext::default())?;
        assert_eq!(attr(&g, 0, "auto_pad"), Some(&Attr::String("SAME_UPPER".into())));
        Ok(())
    }

    #[test]
    fn resnet_block_after_bn_fold_is_fully_fused() -> TestResult {
        let mut rng = Lcg::new(6);
        let mut b = GraphBuilder::new("t");
        let x = input(&mut b, "x", &[-1, 4, 8, 8])?;
        let stem = conv(&mut b, &mut rng, &x, 4, 4, 3, 1, 1, 1, false)?;
        let stem = batch_norm(&mut b, &mut rng, &stem, 4)?;
        let stem = b.add_node("Relu", &[&stem], vec![])?;
        let mut h = stem.clone();
        for (cin, cout, k) in [(4, 2, 1), (2, 2, 3), (2, 8, 1)] {
            h = conv(&mut b, &mut rng, &h, cin, cout, k, 1, k / 2, 1, false)?;
            h = batch_norm(&mut b, &mut rng, &h, cout)?;
            if cout != 8 {
                h = b.add_node("Relu", &[&h], vec![])?;
            }
        }
        let short = conv(&mut b, &mut rng, &stem, 4, 8, 1, 1, 0, 1, false)?;
        let short = batch_norm(&mut b, &mut rng, &short, 8)?;
        let s = b.add_node("Add", &[&h, &short], vec![])?;
        let y = b.add_node("Relu", &[&s], vec![])?;
        output(&mut b, &y)?;
        let mut g = import(b)?;
        let inputs = random_inputs(&g, 2, &mut rng)?;
        check_pass(&BatchNormFold, &mut g, &inputs, TOL)?;
        let stats = check_pass(&ConvFusion, &mut g, &inputs, TOL)?;
        assert_eq!(g.nodes.len(), 5, "{:?}", g.op_histogram());
        assert_eq!(count(&g, "kiln.FusedConv"), 5);
        assert_eq!(stats.notes, vec!["Conv+Relu ×3".to_string(), "Conv ×1".into(), "Conv+Add+Relu ×1".into()]);
        Ok(())
    }

    #[test]
    fn random_chains_fuse_and_match() -> TestResult {
        for seed in 0..16 {
            let mut rng = Lcg::new(1000 + seed);
            let mut b = GraphBuilder::new("t");
            let mut ch = 1 + rng.below(4) as i64;
            let size = 4 + rng.below(5) as i64;
            let mut x = input(&mut b, "x", &[-1, ch, size, size])?;
            let layers = 1 + rng.below(4);
            for _ in 0..layers {
                let group = if rng.below(3) == 0 { ch } else { 1 };
                let cout = if rng.below(2) == 0 { ch } else { group * (1 + rng.below(3) as i64) };
                let k = [1, 3][rng.below(2)];
                let residual_ok = cout == ch;
                let bias = rng.below(2) == 0;
                let mut h = conv(&mut b, &mut rng, &x, ch, cout, k, 1, k / 2, group, bias)?;
                if rng.below(2) == 0 {
                    h = batch_norm(&mut b, &mut rng, &h, cout)?;
                }
                if rng.below(2) == 0 {
                    let shapes: [&[i64]; 3] = [&[cout, 1, 1], &[1, cout, 1, 1], &[1]];
                    let shape = shapes[rng.below(3)];
                    let bias = weight(&mut b, &mut rng, "bias", shape)?;
                    h = b.add_node("Add", &[&h, &bias], vec![])?;
                }
                if residual_ok && rng.below(2) == 0 {
                    h = b.add_node("Add", &[&x, &h], vec![])?;
                }
                h = match rng.below(4) {
                    0 => h,
                    1 => b.add_node("Relu", &[&h], vec![])?,
                    2 => b.add_node("Sigmoid", &[&h], vec![])?,
                    _ => {
                        let s = b.add_node("Sigmoid", &[&h], vec![])?;
                        b.add_node("Mul", &[&h, &s], vec![])?
                    }
                };
                x = h;
                ch = cout;
            }
            output(&mut b, &x)?;
            let mut g = import(b)?;
            let inputs = random_inputs(&g, 2, &mut rng)?;
            check_pass(&BatchNormFold, &mut g, &inputs, TOL).map_err(|e| format!("seed {seed}: {e}"))?;
            check_pass(&ConvFusion, &mut g, &inputs, TOL).map_err(|e| format!("seed {seed}: {e}"))?;
            assert_eq!(g.nodes.len(), layers, "seed {seed}: {:?}", g.op_histogram());
            assert_eq!(count(&g, "kiln.FusedConv"), layers, "seed {seed}");
        }
        Ok(())
    }
}
