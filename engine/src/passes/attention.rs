//! Attention recognition: the scaled dot-product block every transformer
//! exporter writes out,
//!
//! ```text
//! MatMul(Q, KT) → Div(·, c) | Mul(·, c) → Add(·, mask)? → Softmax(last axis) → MatMul(·, V)
//! ```
//!
//! with Q `[B,H,S,D]`, KT `[B,H,D,Sk]`, V `[B,H,Sk,Dv]`, becomes one
//! `kiln.Attention(Q, KT, V, mask?)` with attribute `scale`. A scalar Mul/Div
//! applied to Q or K before the first MatMul (directly or through layout ops
//! such as Transpose and Reshape, as SDPA exports do with √scale on each) is
//! folded into `scale` as well, since a scalar commutes with those.

use super::rewrite::{Bypass, Index, Rewriter, is_f32, scalar_operand};
use super::{Pass, PassContext, PassStats};
use crate::graph::{Attr, Dim, Graph, GraphError, Node, ValueId};
use crate::ops::util::norm_axis;

#[derive(Debug, Clone, Copy, Default)]
pub struct AttentionFusion;

impl Pass for AttentionFusion {
    fn name(&self) -> &'static str {
        "attention"
    }

    fn run(&self, graph: &mut Graph, cx: &PassContext) -> Result<PassStats, GraphError> {
        let _ = cx;
        let idx = Index::new(graph);
        let mut rw = Rewriter::new();
        let (mut masked, mut folded) = (0, 0);
        for i in 0..graph.nodes.len() {
            if graph.nodes[i].op != "Softmax" || rw.is_claimed(i) {
                continue;
            }
            let Some(m) = match_attention(graph, &idx, i) else { continue };
            let last = &graph.nodes[m.last];
            let mut inputs = vec![Some(m.q), Some(m.kt), Some(m.v)];
            if let Some(mask) = m.mask {
                inputs.push(Some(mask));
            }
            let mut fused =
                Node::new(format!("{}_attention", last.name), "kiln.Attention", inputs, last.outputs.clone())
                    .with_attr("scale", Attr::Float(m.scale as f32));
            if m.guarded {
                fused = fused.with_attr("zero_masked_rows", Attr::Int(1));
            }
            if rw.fuse_with(graph, &idx, &m.nodes, m.last, fused, &m.bypass) {
                masked += usize::from(m.mask.is_some());
                folded += usize::from(m.folded);
            }
        }
        let fusions = rw.apply(graph);
        let mut stats = PassStats { rewrites: fusions, notes: Vec::new() };
        if fusions > 0 {
            stats.notes.push(format!("Attention ×{fusions} ({masked} masked)"));
        }
        if folded > 0 {
            stats.notes.push(format!("Q/K scale folded into Attention ×{folded}"));
        }
        Ok(stats)
    }
}

struct Match {
    q: ValueId,
    kt: ValueId,
    v: ValueId,
    mask: Option<ValueId>,
    scale: f64,
    /// Whether a scale on the Q or K path was folded.
    folded: bool,
    nodes: Vec<usize>,
    last: usize,
    /// Q/K scales outside the group, folded by reading past them.
    bypass: Vec<Bypass>,
    /// The softmax had the NaN guard: fully masked rows give zeros.
    guarded: bool,
}

fn match_attention(g: &Graph, idx: &Index, sm_i: usize) -> Option<Match> {
    let sm = &g.nodes[sm_i];
    let s_in = sm.input(0)?;
    let rank = rank_of(g, s_in)?;
    if rank != 4 || norm_axis(sm.attrs.int("axis", -1).ok()?, rank) != Ok(3) {
        return None;
    }
    let softmax_out = *sm.outputs.first()?;
    let (probs, guard) = nan_guard(g, idx, softmax_out).unwrap_or((softmax_out, Vec::new()));
    let (pv_i, pv) = idx.sole_reader_op(g, probs, &["MatMul"])?;
    let v = pv.input(1)?;
    if pv.input(0) != Some(probs) || v == probs || rank_of(g, v) != Some(4) {
        return None;
    }
    let mut nodes = vec![sm_i, pv_i];
    let guarded = !guard.is_empty();
    nodes.extend(guard);

    // Scores, possibly through an additive mask on either side.
    let (scores, mask) = match idx.producer_op(g, s_in, "Add") {
        Some((add_i, add)) => {
            let (a, b) = (add.input(0)?, add.input(1)?);
            let (scores, mask) = if trace_scores(g, idx, a).is_some() { (a, b) } else { (b, a) };
            trace_scores(g, idx, scores)?;
            if rank_of(g, mask).is_none_or(|r| r > 4) || !is_f32(g, mask) || !same_shape(g, s_in, scores) {
                return None;
            }
            nodes.push(add_i);
            (scores, Some(mask))
        }
        None => (s_in, None),
    };
    let (qk_i, mut scale, scale_node) = trace_scores(g, idx, scores)?;
    nodes.push(qk_i);
    nodes.extend(scale_node);
    let qk = &g.nodes[qk_i];
    let (mut q, mut kt) = (qk.input(0)?, qk.input(1)?);
    if !is_f32(g, q) || !is_f32(g, kt) || !is_f32(g, v) || !attention_shapes(g, q, kt, v) {
        return None;
    }

    let (mut bypass, mut folded) = (Vec::new(), false);
    for (slot, operand) in [(0, &mut q), (1, &mut kt)] {
        let Some(f) = path_scale(g, idx, *operand, qk_i, slot) else { continue };
        scale *= f.factor;
        folded = true;
        if f.consumer == qk_i {
            // The scale feeds the MatMul itself: it joins the fused group.
            nodes.push(f.node);
            *operand = f.source;
        } else {
            bypass.push(Bypass { node: f.node, reader: f.consumer, slot: f.slot, source: f.source });
        }
    }
    if !scale.is_finite() || scale == 0.0 {
        return None;
    }
    Some(Match { q, kt, v, mask, scale, folded, nodes, last: pv_i, bypass, guarded })
}

/// `Where(IsNaN(p), 0, p)`: the guard PyTorch's SDPA export puts after the
/// softmax so that fully masked rows give zeros instead of NaN (kiln.Attention's
/// `zero_masked_rows`). Returns the guarded value and the two nodes.
fn nan_guard(g: &Graph, idx: &Index, probs: ValueId) -> Option<(ValueId, Vec<usize>)> {
    let readers = idx.distinct_readers(probs);
    let [a, b] = readers.as_slice() else { return None };
    let (isnan_i, where_i) = if g.nodes[*a].op == "IsNaN" { (*a, *b) } else { (*b, *a) };
    let (isnan, wh) = (&g.nodes[isnan_i], &g.nodes[where_i]);
    if isnan.op != "IsNaN" || wh.op != "Where" {
        return None;
    }
    let flag = *isnan.outputs.first()?;
    let zero = wh.input(1)?;
    let is_zero = g.constant(zero).and_then(|t| t.as_f32()).is_some_and(|v| v.iter().all(|&x| x == 0.0));
    if wh.input(0) != Some(flag) || wh.input(2) != Some(probs) || !is_zero || idx.sole_reader(flag) != Some(where_i) {
        return None;
    }
    Some((*wh.outputs.first()?, vec![isnan_i, where_i]))
}

/// `MatMul(Q, KT)`, optionally scaled by a scalar Mul/Div: the MatMul's node,
/// the scale and the scaling node.
fn trace_scores(g: &Graph, idx: &Index, v: ValueId) -> Option<(usize, f64, Option<usize>)> {
    let p = idx.producer(v)?;
    let n = &g.nodes[p];
    match n.op.as_str() {
        "MatMul" => Some((p, 1.0, None)),
        "Mul" | "Div" => {
            let (x, c) = scalar_operand(g, n)?;
            let scale = if n.op == "Div" { 1.0 / c } else { c };
            let (mm_i, _) = idx.producer_op(g, x, "MatMul")?;
            Some((mm_i, scale, Some(p)))
        }
        _ => None,
    }
}

/// A scalar scale found on the Q or K path.
struct PathScale {
    /// The Mul/Div node, its unscaled operand and its factor.
    node: usize,
    source: ValueId,
    factor: f64,
    /// The node (and input slot) reading the scaled value.
    consumer: usize,
    slot: usize,
}

/// Ops a scalar factor commutes with, read through their data input 0.
const LAYOUT_OPS: &[&str] = &["Transpose", "Reshape", "Squeeze", "Unsqueeze", "Flatten", "Identity"];

/// Walks up from `v` (read by `consumer` at `slot`) through layout ops to a
/// scalar Mul/Div whose result reaches only this path.
fn path_scale(g: &Graph, idx: &Index, mut v: ValueId, mut consumer: usize, mut slot: usize) -> Option<PathScale> {
    for _ in 0..4 {
        if idx.sole_reader(v) != Some(consumer) || idx.readers(v).len() != 1 {
            return None;
        }
        let p = idx.producer(v)?;
        let n = &g.nodes[p];
        match n.op.as_str() {
            "Mul" | "Div" => {
                let (source, c) = scalar_operand(g, n)?;
                let factor = if n.op == "Div" { 1.0 / c } else { c };
                // A scalar that is a rank-≥1 tensor could broadcast the rank.
                let same = g.shape(source).is_some() && g.shape(source) == g.shape(v);
                return (same && is_f32(g, source)).then_some(PathScale { node: p, source, factor, consumer, slot });
            }
            op if LAYOUT_OPS.contains(&op) => {
                (consumer, slot) = (p, 0);
                v = n.input(0)?;
            }
            _ => return None,
        }
    }
    None
}

/// Q `[B,H,S,D]`, KT `[B,H,D,Sk]`, V `[B,H,Sk,Dv]` with matching batch and
/// head dims: the MatMuls must not rely on broadcasting, which the fused op
/// lacks. Two symbolic dims are taken to match (shape inference may name one
/// size twice); a fixed dim must equal the other.
fn attention_shapes(g: &Graph, q: ValueId, kt: ValueId, v: ValueId) -> bool {
    let (Some(q), Some(k), Some(v)) = (g.shape(q), g.shape(kt), g.shape(v)) else { return false };
    let same = |a: &Dim, b: &Dim| a == b || (!a.is_fixed() && !b.is_fixed());
    q.len() == 4
        && k.len() == 4
        && v.len() == 4
        && (0..2).all(|i| same(&q[i], &k[i]) && same(&q[i], &v[i]))
        && same(&q[3], &k[2])
        && same(&k[3], &v[2])
}

fn rank_of(g: &Graph, v: ValueId) -> Option<usize> {
    g.shape(v).map(Vec::len)
}

/// False only when both shapes are known and differ (a mask that broadcasts
/// the scores to a bigger shape is not the fused op's semantics).
fn same_shape(g: &Graph, a: ValueId, b: ValueId) -> bool {
    match (g.shape(a), g.shape(b)) {
        (Some(x), Some(y)) => x == y,
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::passes::testing::{Tb, check_pass, count, max_rel_diff, random, random_data, sym};
    use crate::passes::{PassContext, run_pass};

    const B: usize = 2;
    const H: usize = 3;
    const S: usize = 5;
    const D: usize = 4;

    #[derive(Clone, Copy, Debug)]
    enum Scale {
        Div,
        Mul,
        MulLeft,
        OnQ,
        OnBothThroughTranspose,
    }

    /// Inputs q [B,H,S,D], k [B,H,S,D] (transposed in the graph), v, mask [B,1,1,S].
    fn build(scale: Scale, mask: Option<bool>) -> Graph {
        let mut b = Tb::new();
        let mut q = b.input("q", &[B, H, S, D]);
        let mut k = b.input("k", &[B, H, S, D]);
        let v = b.input("v", &[B, H, S, D]);
        let m = b.input("mask", &[B, 1, 1, S]);
        let root = (D as f32).sqrt();
        match scale {
            Scale::OnQ => {
                let c = b.scalar(1.0 / root);
                q = b.node("Mul", &[q, c]);
            }
            Scale::OnBothThroughTranspose => {
                let c = b.scalar(root.sqrt());
                q = b.node("Div", &[q, c]);
                let c2 = b.scalar(1.0 / root.sqrt());
                k = b.node("Mul", &[c2, k]);
            }
            _ => {}
        }
        let kt = b.node_attrs("Transpose", &[k], vec![("perm", Attr::Ints(vec![0, 1, 3, 2]))]);
        let mut s = b.node("MatMul", &[q, kt]);
        match scale {
            Scale::Div => {
                let c = b.scalar(root);
                s = b.node("Div", &[s, c]);
            }
            Scale::Mul => {
                let c = b.scalar(1.0 / root);
                s = b.node("Mul", &[s, c]);
            }
            Scale::MulLeft => {
                let c = b.scalar(1.0 / root);
                s = b.node("Mul", &[c, s]);
            }
            _ => {}
        }
        match mask {
            Some(true) => s = b.node("Add", &[m, s]),
            Some(false) => s = b.node("Add", &[s, m]),
            None => {}
        }
        let p = b.node_attrs("Softmax", &[s], vec![("axis", Attr::Int(-1))]);
        let y = b.node("MatMul", &[p, v]);
        b.finish(&[y]).expect("build")
    }

    fn inputs() -> Vec<crate::Tensor> {
        let mut mask = vec![0.0; B * S];
        mask[S - 1] = -10000.0;
        mask[2 * S - 2] = -10000.0;
        vec![
            random(&[B, H, S, D], 1, 2.0),
            random(&[B, H, S, D], 2, 2.0),
            random(&[B, H, S, D], 3, 2.0),
            crate::Tensor::new(vec![B, 1, 1, S], crate::TensorData::F32(mask)).expect("mask"),
        ]
    }

    #[test]
    fn scaled_masked_attention_fuses_in_every_ordering() {
        let scales = [Scale::Div, Scale::Mul, Scale::MulLeft, Scale::OnQ, Scale::OnBothThroughTranspose];
        for scale in scales {
            for mask in [None, Some(false), Some(true)] {
                let mut after = build(scale, mask);
                let what = format!("{scale:?} mask={mask:?}");
                let stats = check_pass(&AttentionFusion, &mut after, &inputs(), 1e-5).expect(&what);
                assert_eq!(stats.rewrites, 1, "{what}");
                assert_eq!(count(&after, "kiln.Attention"), 1, "{what}");
                assert_eq!(count(&after, "Softmax"), 0, "{what}");
                assert_eq!(count(&after, "MatMul"), 0, "{what}");
                assert_eq!(count(&after, "Mul") + count(&after, "Div"), 0, "{what}: scales folded");
                let att = after.nodes.iter().find(|n| n.op == "kiln.Attention").expect("attention");
                let s = att.attrs.float("scale", 0.0).expect("scale");
                assert!((s - 0.5).abs() < 1e-6, "{what}: scale {s}");
                assert_eq!(att.inputs.len(), if mask.is_some() { 4 } else { 3 }, "{what}");
            }
        }
    }

    #[test]
    fn softmax_over_another_axis_or_shared_scores_stay() {
        let mut b = Tb::new();
        let q = b.input("q", &[1, 2, 3, 4]);
        let kt = b.input("kt", &[1, 2, 4, 3]);
        let v = b.input("v", &[1, 2, 3, 4]);
        let s = b.node("MatMul", &[q, kt]);
        let p = b.node_attrs("Softmax", &[s], vec![("axis", Attr::Int(2))]);
        let y = b.node("MatMul", &[p, v]);
        let mut g = b.finish(&[y]).expect("build");
        assert_eq!(run_pass(&AttentionFusion, &mut g, &PassContext::default()).expect("pass").rewrites, 0);

        let mut b = Tb::new();
        let q = b.input("q", &[1, 2, 3, 4]);
        let kt = b.input("kt", &[1, 2, 4, 3]);
        let v = b.input("v", &[1, 2, 3, 4]);
        let s = b.node("MatMul", &[q, kt]);
        let c = b.constant(&[1], random_data(1, 9, 1.0));
        let sc = b.node("Mul", &[s, c]);
        let p = b.node_attrs("Softmax", &[sc], vec![("axis", Attr::Int(-1))]);
        let y = b.node("MatMul", &[p, v]);
        // The attention probabilities are an output too.
        let mut g = b.finish(&[y, p]).expect("build");
        assert_eq!(run_pass(&AttentionFusion, &mut g, &PassContext::default()).expect("pass").rewrites, 0);
        assert_eq!(count(&g, "Softmax"), 1);
        assert_eq!(count(&g, "Mul"), 1);
    }

    /// A BERT-like layer as an exporter writes it, through the ONNX importer
    /// with symbolic batch and sequence: decomposed LayerNorm, Q/K/V
    /// projections split into heads, masked scaled attention, erf GELU.
    fn bert_layer() -> Result<Graph, kiln_onnx::OnnxError> {
        use kiln_onnx::{DataType, Dim as OnnxDim, GraphBuilder, attr_int, attr_ints};
        let mut b = GraphBuilder::new("bert");
        b.add_input("x", DataType::Float, &[sym("batch"), sym("seq"), OnnxDim::Fixed(8)])?;
        b.add_input("mask", DataType::Float, &[sym("batch"), OnnxDim::Fixed(1), OnnxDim::Fixed(1), sym("seq")])?;
        let last = || vec![attr_ints("axes", &[-1])];
        let mean = b.add_node("ReduceMean", &["x"], last())?;
        let d = b.add_node("Sub", &["x", &mean], vec![])?;
        let two = b.add_initializer_f32("two", &[], &[2.0])?;
        let sq = b.add_node("Pow", &[&d, &two], vec![])?;
        let var = b.add_node("ReduceMean", &[&sq], last())?;
        let eps = b.add_initializer_f32("eps", &[], &[1e-12])?;
        let ve = b.add_node("Add", &[&var, &eps], vec![])?;
        let std = b.add_node("Sqrt", &[&ve], vec![])?;
        let n = b.add_node("Div", &[&d, &std], vec![])?;
        let gamma = b.add_initializer_f32("gamma", &[8], &random_data(8, 20, 1.0))?;
        let beta = b.add_initializer_f32("beta", &[8], &random_data(8, 21, 1.0))?;
        let n = b.add_node("Mul", &[&n, &gamma], vec![])?;
        let h = b.add_node("Add", &[&n, &beta], vec![])?;
        let heads = b.add_initializer_i64("heads", &[4], &[0, 0, 2, 4])?;
        let proj = |b: &mut GraphBuilder, seed: u64, perm: &[i64]| -> Result<String, kiln_onnx::OnnxError> {
            let w = b.add_initializer_f32(&format!("w{seed}"), &[8, 8], &random_data(64, seed, 0.5))?;
            let bias = b.add_initializer_f32(&format!("b{seed}"), &[8], &random_data(8, seed + 1, 0.5))?;
            let y = b.add_node("MatMul", &[&h, &w], vec![])?;
            let y = b.add_node("Add", &[&y, &bias], vec![])?;
            let y = b.add_node("Reshape", &[&y, &heads], vec![])?;
            b.add_node("Transpose", &[&y], vec![attr_ints("perm", perm)])
        };
        let q = proj(&mut b, 30, &[0, 2, 1, 3])?;
        let kt = proj(&mut b, 40, &[0, 2, 3, 1])?;
        let v = proj(&mut b, 50, &[0, 2, 1, 3])?;
        let s = b.add_node("MatMul", &[&q, &kt], vec![])?;
        let root = b.add_initializer_f32("root", &[], &[2.0])?;
        let s = b.add_node("Div", &[&s, &root], vec![])?;
        let s = b.add_node("Add", &[&s, "mask"], vec![])?;
        let p = b.add_node("Softmax", &[&s], vec![attr_int("axis", -1)])?;
        let c = b.add_node("MatMul", &[&p, &v], vec![])?;
        let c = b.add_node("Transpose", &[&c], vec![attr_ints("perm", &[0, 2, 1, 3])])?;
        let merge = b.add_initializer_i64("merge", &[3], &[0, 0, 8])?;
        let c = b.add_node("Reshape", &[&c, &merge], vec![])?;
        let r2 = b.add_initializer_f32("r2", &[], &[std::f32::consts::SQRT_2])?;
        let e = b.add_node("Div", &[&c, &r2], vec![])?;
        let e = b.add_node("Erf", &[&e], vec![])?;
        let one = b.add_initializer_f32("one", &[], &[1.0])?;
        let e = b.add_node("Add", &[&e, &one], vec![])?;
        let e = b.add_node("Mul", &[&c, &e], vec![])?;
        let half = b.add_initializer_f32("half", &[], &[0.5])?;
        b.add_node_with_outputs("Mul", &[&e, &half], &["y"], vec![])?;
        b.add_output("y", DataType::Float, &[sym("batch"), sym("seq"), OnnxDim::Fixed(8)])?;
        Ok(crate::import::import_model(&b.finish(17), None).expect("import"))
    }

    #[test]
    fn imported_bert_layer_fuses_layer_norm_attention_and_gelu() {
        use crate::passes::{GeluFusion, LayerNormFusion};
        let g = bert_layer().expect("build");
        let mut mask = vec![0.0; 2 * 3];
        mask[2] = -10000.0;
        let inputs = [
            random(&[2, 3, 8], 60, 2.0),
            crate::Tensor::new(vec![2, 1, 1, 3], crate::TensorData::F32(mask)).expect("mask"),
        ];
        let before = crate::reference::run(&g, &inputs, Default::default()).expect("run");
        let mut after = g.clone();
        let cx = PassContext::default();
        let passes: [&dyn crate::passes::Pass; 3] = [&LayerNormFusion, &GeluFusion, &AttentionFusion];
        for pass in passes {
            assert_eq!(run_pass(pass, &mut after, &cx).expect("pass").rewrites, 1, "{}", pass.name());
        }
        for (op, n) in [("LayerNormalization", 1), ("Gelu", 1), ("kiln.Attention", 1), ("Softmax", 0), ("Erf", 0)] {
            assert_eq!(count(&after, op), n, "{op}");
        }
        let got = crate::reference::run(&after, &inputs, Default::default()).expect("run");
        let diff = max_rel_diff(&before, &got).expect("comparable outputs");
        assert!(diff <= 1e-5, "outputs differ by {diff}");
        assert_eq!(after.value(after.outputs[0]).name, "y");
    }
}
