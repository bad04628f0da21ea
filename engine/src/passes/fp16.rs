//! FP16 precision assignment. Every floating-point node computes in FP16
//! except the numerically sensitive ops of [`FP32_OPS`], and the FP32 weights
//! that only FP16 nodes read are rounded to half precision and stored as such.
//!
//! The allow-list follows what TensorRT and ONNX Runtime's float16 converter
//! keep in FP32: reductions whose sums overflow or lose small terms in FP16
//! (ReduceMean/ReduceSum, the normalisations built on them), exponentials and
//! powers that overflow past 65504 (Exp, Pow, Softmax, Erf's tail), square
//! roots and reciprocals of small variances, and float index math (Range,
//! CumSum). Div is *not* on it: dividing by a constant or a well-scaled
//! tensor is safe in FP16 and fused LayerNorms no longer contain the one Div
//! that is not.
//!
//! Two refinements keep the result faithful:
//! - a node reading a constant that FP16 cannot represent (|x| > 65504, such
//!   as the `-3.4e38` attention-mask fill) stays FP32, since rounding would
//!   turn it into infinity and `0 · inf` into NaN;
//! - pure data-movement ops (Reshape, Transpose, …) take the precision of
//!   their producer, so an FP32 island is not split by a reshape.
//!
//! Integer and boolean nodes (shape math, comparisons) have no float output
//! and keep the default precision.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use super::rewrite::components;
use super::{Pass, PassContext, PassStats};
use crate::graph::{Attr, Graph, GraphError, Node, Precision};
use crate::reference::round_f16;
use crate::{DType, Tensor, TensorData};

/// Ops that always compute in FP32.
pub const FP32_OPS: &[&str] = &[
    "Softmax",
    "LogSoftmax",
    "LayerNormalization",
    "ReduceMean",
    "ReduceSum",
    "ReduceSumSquare",
    "ReduceL2",
    "ReduceLogSumExp",
    "ReduceProd",
    "Pow",
    "Sqrt",
    "Reciprocal",
    "Exp",
    "Log",
    "Erf",
    "CumSum",
    "Range",
];

/// Ops that only move data; they follow their producer's precision.
const DATA_MOVEMENT: &[&str] =
    &["Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "Identity", "Expand", "Slice", "Gather", "Concat"];

/// Largest finite FP16 value.
const F16_MAX: f32 = 65504.0;

#[derive(Debug, Clone, Copy, Default)]
pub struct Fp16Assignment;

impl Pass for Fp16Assignment {
    fn name(&self) -> &'static str {
        "fp16"
    }

    fn run(&self, graph: &mut Graph, cx: &PassContext) -> Result<PassStats, GraphError> {
        if cx.precision != Precision::F16 {
            return Ok(PassStats::default());
        }
        let producers = graph.producers();
        // Whether each node has a float output; others keep their precision.
        let float: Vec<bool> = graph
            .nodes
            .iter()
            .map(|n| n.outputs.iter().any(|&o| graph.value_type(o).is_some_and(|t| t.dtype == DType::F32)))
            .collect();
        let mut f16_nodes = 0;
        let mut overflow = 0;
        for i in 0..graph.nodes.len() {
            if !float[i] {
                continue;
            }
            let n = &graph.nodes[i];
            let fp32 = if FP32_OPS.contains(&n.op.as_str()) {
                true
            } else if reads_unrepresentable(graph, n) {
                overflow += 1;
                true
            } else if DATA_MOVEMENT.contains(&n.op.as_str()) {
                // Follow the producers of the float data; graph inputs and
                // constants do not pull towards FP32.
                let sources: Vec<usize> = n
                    .inputs
                    .iter()
                    .flatten()
                    .filter(|&&v| graph.value_type(v).is_some_and(|t| t.dtype == DType::F32))
                    .filter_map(|v| producers.get(v).copied())
                    .collect();
                !sources.is_empty() && sources.iter().all(|&p| float[p] && graph.nodes[p].precision == Precision::F32)
            } else {
                false
            };
            let p = if fp32 { Precision::F32 } else { Precision::F16 };
            graph.nodes[i].precision = p;
            f16_nodes += usize::from(!fp32);
        }
        let rounded = round_weights(graph);
        let (islands, signatures) = islands(graph, &float);

        let mut stats = PassStats { rewrites: f16_nodes, notes: Vec::new() };
        stats.notes.push(format!("FP16 nodes: {f16_nodes}, weights rounded to FP16: {rounded}"));
        stats.notes.push(format!("FP32 islands: {islands}"));
        for (sig, count) in signatures {
            stats.notes.push(format!("  FP32 island {sig} ×{count}"));
        }
        if overflow > 0 {
            stats.notes.push(format!("kept FP32 for constants beyond FP16 range: {overflow} node(s)"));
        }
        Ok(stats)
    }
}

/// Whether `n` reads an FP32 constant (or carries a tensor attribute) with a
/// finite value FP16 would turn into infinity.
fn reads_unrepresentable(g: &Graph, n: &Node) -> bool {
    let too_big = |t: &Tensor| match t.data() {
        TensorData::F32(v) => v.iter().any(|x| x.is_finite() && x.abs() > F16_MAX),
        _ => false,
    };
    n.inputs.iter().flatten().filter_map(|&v| g.constant(v)).any(too_big)
        || n.attrs.iter().any(|(_, a)| matches!(a, Attr::Tensor(t) if too_big(t)))
}

/// Rounds FP32 constants read only by FP16 nodes (and not graph outputs) to
/// half precision in place, marking their storage. Returns how many.
fn round_weights(g: &mut Graph) -> usize {
    let mut readers: HashMap<usize, (usize, bool)> = HashMap::new(); // value → (readers, all FP16)
    for n in &g.nodes {
        for &v in n.inputs.iter().flatten() {
            let e = readers.entry(v).or_insert((0, true));
            e.0 += 1;
            e.1 &= n.precision == Precision::F16;
        }
    }
    let mut rounded = 0;
    for (id, value) in g.values.iter_mut().enumerate() {
        let Some(t) = &value.constant else { continue };
        if t.dtype() != DType::F32 || value.storage == Precision::F16 || g.outputs.contains(&id) {
            continue;
        }
        if let Some(&(count, all_f16)) = readers.get(&id)
            && count > 0
            && all_f16
        {
            value.constant = Some(Arc::new(round_f16(t)));
            value.storage = Precision::F16;
            rounded += 1;
        }
    }
    rounded
}

/// Maximal connected groups of FP32 float nodes, and how many islands have
/// each set of ops (e.g. `[LayerNormalization]`).
fn islands(g: &Graph, float: &[bool]) -> (usize, BTreeMap<String, usize>) {
    let fp32 = |i: usize| float[i] && g.nodes[i].precision == Precision::F32;
    let groups = components(g, fp32, |i| g.nodes[i].inputs.iter().flatten().copied().collect());
    let mut signatures: BTreeMap<String, usize> = BTreeMap::new();
    for group in &groups {
        let mut ops: Vec<&str> = group.iter().map(|&i| g.nodes[i].op.as_str()).collect();
        ops.sort_unstable();
        ops.dedup();
        *signatures.entry(format!("[{}]", ops.join("+"))).or_default() += 1;
    }
    (groups.len(), signatures)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::passes::run_pass;
    use crate::passes::testing::{Tb, check_pass_with, random, random_data};

    fn f16_cx() -> PassContext {
        PassContext { precision: Precision::F16, ..PassContext::default() }
    }

    /// x → MatMul → Add(bias) → LayerNorm → Relu → MatMul → Softmax → Reshape,
    /// plus a branch multiplying by a constant FP16 cannot hold.
    fn build() -> (Graph, Vec<Tensor>) {
        let mut b = Tb::new();
        let x = b.input("x", &[3, 8]);
        let w1 = b.constant(&[8, 8], random_data(64, 1, 0.7));
        let b1 = b.constant(&[8], random_data(8, 2, 0.3));
        let h = b.node("MatMul", &[x, w1]);
        let h = b.node("Add", &[h, b1]);
        let gamma = b.constant(&[8], random_data(8, 3, 1.0));
        let beta = b.constant(&[8], random_data(8, 4, 1.0));
        let h = b.node_attrs("LayerNormalization", &[h, gamma, beta], vec![("epsilon", Attr::Float(1e-5))]);
        let h = b.node("Relu", &[h]);
        let w2 = b.constant(&[8, 4], random_data(32, 5, 0.7));
        let s = b.node("MatMul", &[h, w2]);
        let p = b.node_attrs("Softmax", &[s], vec![("axis", Attr::Int(-1))]);
        let shape = b.ints(&[12]);
        let flat = b.node("Reshape", &[p, shape]);
        let big = b.scalar(-3.0e38);
        let zero_mask = b.node("Sub", &[x, x]);
        let fill = b.node("Mul", &[zero_mask, big]);
        let g = b.finish(&[flat, fill]).expect("build");
        (g, vec![random(&[3, 8], 9, 2.0)])
    }

    fn node<'g>(g: &'g Graph, op: &str) -> &'g Node {
        g.nodes.iter().find(|n| n.op == op).expect(op)
    }

    #[test]
    fn assigns_fp16_except_sensitive_ops_and_rounds_weights() {
        let (g, inputs) = build();
        let mut after = g.clone();
        let stats = check_pass_with(&Fp16Assignment, &mut after, &f16_cx(), &inputs, 2e-2, true).expect("check");
        for op in ["MatMul", "Add", "Relu", "Sub"] {
            assert_eq!(node(&after, op).precision, Precision::F16, "{op}");
        }
        for op in ["LayerNormalization", "Softmax", "Reshape", "Mul"] {
            assert_eq!(node(&after, op).precision, Precision::F32, "{op}");
        }
        // MatMul weights and the bias are rounded and stored as FP16.
        let mm = node(&after, "MatMul");
        let w = mm.input(1).expect("weight");
        assert_eq!(after.values[w].storage, Precision::F16);
        let orig = g.nodes.iter().find(|n| n.op == "MatMul").and_then(|n| n.input(1)).and_then(|w| g.constant(w));
        let (orig, now) =
            (orig.expect("w").as_f32().expect("f32"), after.constant(w).expect("w").as_f32().expect("f32"));
        assert!(orig.iter().zip(now).any(|(a, b)| a != b), "weights were rounded");
        assert!(now.iter().all(|&v| half::f16::from_f32(v).to_f32() == v), "weights are FP16 values");
        // LayerNorm's gamma stays FP32.
        let ln = node(&after, "LayerNormalization");
        assert_eq!(after.values[ln.input(1).expect("gamma")].storage, Precision::F32);
        assert!(stats.notes.iter().any(|n| n == "FP32 islands: 3"), "{:?}", stats.notes);
        assert!(stats.notes.iter().any(|n| n.contains("[Reshape+Softmax] ×1")), "{:?}", stats.notes);
        assert!(after.weight_bytes() < g.weight_bytes());
    }

    #[test]
    fn fp32_builds_are_untouched() {
        let (mut g, _) = build();
        let stats = run_pass(&Fp16Assignment, &mut g, &PassContext::default()).expect("pass");
        assert_eq!(stats.rewrites, 0);
        assert!(g.nodes.iter().all(|n| n.precision == Precision::F32));
        assert!(g.values.iter().all(|v| v.storage == Precision::F32));
    }

    #[test]
    fn allow_list_covers_the_sensitive_ops() {
        for op in ["Softmax", "LayerNormalization", "ReduceMean", "ReduceSum", "Pow", "Sqrt", "Exp", "Erf"] {
            assert!(FP32_OPS.contains(&op), "{op}");
        }
        for op in ["MatMul", "kiln.Attention", "kiln.FusedConv", "kiln.Dense", "Gelu", "Div"] {
            assert!(!FP32_OPS.contains(&op), "{op}");
        }
    }
}
