//! Pattern-matching helpers shared by the recognition passes (LayerNorm, GELU,
//! attention): who produces and who reads each value, scalar constants, and a
//! rewriter that swaps a matched group of nodes for one fused node in place.
//!
//! Matching works on a snapshot of the graph: every match of a pass is found
//! first, then all are applied at once. Matches never share a node (the
//! rewriter refuses overlaps), so the snapshot stays valid for all of them.

use std::collections::{HashMap, HashSet};

use crate::TensorData;
use crate::graph::{Graph, Node, ValueId};

/// Producers and readers of every value of a graph snapshot.
#[derive(Debug)]
pub(crate) struct Index {
    producer: HashMap<ValueId, usize>,
    readers: HashMap<ValueId, Vec<usize>>,
    outputs: HashSet<ValueId>,
}

impl Index {
    pub fn new(g: &Graph) -> Self {
        Self { producer: g.producers(), readers: g.consumers(), outputs: g.outputs.iter().copied().collect() }
    }

    pub fn producer(&self, v: ValueId) -> Option<usize> {
        self.producer.get(&v).copied()
    }

    /// The node producing `v` when its op is `op`.
    pub fn producer_op<'g>(&self, g: &'g Graph, v: ValueId, op: &str) -> Option<(usize, &'g Node)> {
        let i = self.producer(v)?;
        let n = &g.nodes[i];
        (n.op == op).then_some((i, n))
    }

    /// Nodes reading `v`, once per input slot.
    pub fn readers(&self, v: ValueId) -> &[usize] {
        self.readers.get(&v).map_or(&[], Vec::as_slice)
    }

    /// Distinct nodes reading `v`, in graph order.
    pub fn distinct_readers(&self, v: ValueId) -> Vec<usize> {
        let mut r = self.readers(v).to_vec();
        r.sort_unstable();
        r.dedup();
        r
    }

    pub fn is_output(&self, v: ValueId) -> bool {
        self.outputs.contains(&v)
    }

    /// The one node reading `v` (through one or more of its inputs) when
    /// nothing else does and `v` is not a graph output.
    pub fn sole_reader(&self, v: ValueId) -> Option<usize> {
        if self.is_output(v) {
            return None;
        }
        let r = self.distinct_readers(v);
        (r.len() == 1).then(|| r[0])
    }

    /// The sole reader of `v` when its op is one of `ops`.
    pub fn sole_reader_op<'g>(&self, g: &'g Graph, v: ValueId, ops: &[&str]) -> Option<(usize, &'g Node)> {
        let i = self.sole_reader(v)?;
        let n = &g.nodes[i];
        ops.contains(&n.op.as_str()).then_some((i, n))
    }

    /// Whether every value produced by `group` other than those of `keep` is
    /// read only inside the group and is no graph output, so the group can be
    /// replaced by one node producing `keep`'s outputs.
    pub fn is_closed(&self, g: &Graph, group: &[usize], keep: usize) -> bool {
        group.iter().filter(|&&i| i != keep).all(|&i| {
            g.nodes[i].outputs.iter().all(|&v| !self.is_output(v) && self.readers(v).iter().all(|r| group.contains(r)))
        })
    }
}

/// The value of a one-element numeric constant (any rank).
pub(crate) fn scalar(g: &Graph, v: ValueId) -> Option<f64> {
    let t = g.constant(v)?;
    match t.data() {
        TensorData::F32(x) if x.len() == 1 => Some(f64::from(x[0])),
        TensorData::F64(x) if x.len() == 1 => Some(x[0]),
        TensorData::I64(x) if x.len() == 1 => Some(x[0] as f64),
        TensorData::I32(x) if x.len() == 1 => Some(f64::from(x[0])),
        _ => None,
    }
}

/// Relative closeness, for constants exporters write with float rounding.
pub(crate) fn near(x: f64, target: f64) -> bool {
    (x - target).abs() <= 1e-4 * target.abs().max(1e-12)
}

/// Whether `v` is a one-element constant close to `target`.
pub(crate) fn is_scalar(g: &Graph, v: ValueId, target: f64) -> bool {
    scalar(g, v).is_some_and(|x| near(x, target))
}

/// For a two-input node with one scalar-constant operand: the other operand
/// and the scalar. The constant may be on either side only for commutative
/// ops (Add, Mul); Sub and Div take it on the right.
pub(crate) fn scalar_operand(g: &Graph, node: &Node) -> Option<(ValueId, f64)> {
    if node.inputs.len() != 2 {
        return None;
    }
    let (a, b) = (node.input(0)?, node.input(1)?);
    if let Some(s) = scalar(g, b) {
        return Some((a, s));
    }
    match node.op.as_str() {
        "Add" | "Mul" => scalar(g, a).map(|s| (b, s)),
        _ => None,
    }
}

/// For a two-input node reading `v`: its other input (`v` itself for `op(v, v)`).
pub(crate) fn other_input(node: &Node, v: ValueId) -> Option<ValueId> {
    if node.inputs.len() != 2 {
        return None;
    }
    let (a, b) = (node.input(0)?, node.input(1)?);
    if a == v {
        Some(b)
    } else if b == v {
        Some(a)
    } else {
        None
    }
}

/// A node outside a fused group to delete: its only reader, at input `slot`,
/// reads `source` (the deleted node's own input) instead.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Bypass {
    pub node: usize,
    pub reader: usize,
    pub slot: usize,
    pub source: ValueId,
}

/// Collects fusions over one snapshot and applies them together.
#[derive(Debug)]
pub(crate) struct Rewriter {
    claimed: HashSet<usize>,
    replace: HashMap<usize, Node>,
    remove: HashSet<usize>,
    /// (node, input slot, new value) edits made outside fused groups.
    rewire: Vec<(usize, usize, ValueId)>,
}

impl Rewriter {
    pub fn new() -> Self {
        Self { claimed: HashSet::new(), replace: HashMap::new(), remove: HashSet::new(), rewire: Vec::new() }
    }

    /// Replaces the matched `group` by `fused`, which takes the place of node
    /// `keep` (the last of the group, whose outputs `fused` must produce, so
    /// readers and graph outputs keep their values). Refused, with nothing
    /// changed, when a node is already part of another fusion or an
    /// intermediate value escapes the group.
    pub fn fuse(&mut self, g: &Graph, idx: &Index, group: &[usize], keep: usize, fused: Node) -> bool {
        self.fuse_with(g, idx, group, keep, fused, &[])
    }

    /// [`Self::fuse`], also deleting nodes outside the group whose single
    /// reader is switched to read past them. Used to fold a scale that sits
    /// outside the group.
    pub fn fuse_with(
        &mut self,
        g: &Graph,
        idx: &Index,
        group: &[usize],
        keep: usize,
        fused: Node,
        bypass: &[Bypass],
    ) -> bool {
        let mut all: Vec<usize> = group.to_vec();
        all.push(keep);
        all.sort_unstable();
        all.dedup();
        let touched = || all.iter().copied().chain(bypass.iter().flat_map(|b| [b.node, b.reader]));
        let mut seen = HashSet::new();
        if touched().any(|i| self.claimed.contains(&i) || (!all.contains(&i) && !seen.insert(i)))
            || !idx.is_closed(g, &all, keep)
        {
            return false;
        }
        self.claimed.extend(touched());
        for b in bypass {
            self.remove.insert(b.node);
            self.rewire.push((b.reader, b.slot, b.source));
        }
        self.remove.extend(all.iter().copied().filter(|&i| i != keep));
        self.replace.insert(keep, fused);
        true
    }

    /// Whether node `i` is already part of a fusion.
    pub fn is_claimed(&self, i: usize) -> bool {
        self.claimed.contains(&i)
    }

    /// Applies every fusion; the graph stays in topological order because a
    /// fused node sits where the last node of its group was.
    pub fn apply(mut self, g: &mut Graph) -> usize {
        let n = self.replace.len();
        for &(i, slot, v) in &self.rewire {
            if let Some(input) = g.nodes.get_mut(i).and_then(|n| n.inputs.get_mut(slot)) {
                *input = Some(v);
            }
        }
        let nodes = std::mem::take(&mut g.nodes);
        g.nodes = nodes
            .into_iter()
            .enumerate()
            .filter(|(i, _)| !self.remove.contains(i))
            .map(|(i, node)| self.replace.remove(&i).unwrap_or(node))
            .collect();
        n
    }
}

/// Graph-building helpers for the passes' unit tests.
#[cfg(test)]
pub(crate) mod testing {
    use crate::graph::{Attr, Dim, Graph, GraphError, Node, ValueId, ValueType};
    use crate::passes::{Pass, PassContext, PassStats, run_pass};
    use crate::reference::{RunOptions, run};
    use crate::{DType, Tensor, TensorData};

    /// Builds a graph node by node; `finish` infers every type.
    #[derive(Debug)]
    pub struct Tb {
        pub g: Graph,
        count: usize,
    }

    impl Tb {
        pub fn new() -> Self {
            Self { g: Graph::new("test", 17), count: 0 }
        }

        pub fn input(&mut self, name: &str, shape: &[usize]) -> ValueId {
            let dims = shape.iter().map(|&d| Dim::fixed(d as i64)).collect();
            self.input_dims(name, dims)
        }

        pub fn input_dims(&mut self, name: &str, dims: Vec<Dim>) -> ValueId {
            let id = self.g.add_value(name, Some(ValueType::new(DType::F32, dims)));
            self.g.inputs.push(id);
            id
        }

        pub fn constant(&mut self, shape: &[usize], data: Vec<f32>) -> ValueId {
            let name = self.g.fresh_name("c");
            let t = Tensor::new(shape.to_vec(), TensorData::F32(data)).expect("constant");
            self.g.add_constant(name, t)
        }

        pub fn scalar(&mut self, x: f32) -> ValueId {
            self.constant(&[], vec![x])
        }

        pub fn ints(&mut self, data: &[i64]) -> ValueId {
            let name = self.g.fresh_name("i");
            let t = Tensor::new(vec![data.len()], TensorData::I64(data.to_vec())).expect("ints");
            self.g.add_constant(name, t)
        }

        pub fn node(&mut self, op: &str, inputs: &[ValueId]) -> ValueId {
            self.node_attrs(op, inputs, vec![])
        }

        pub fn node_attrs(&mut self, op: &str, inputs: &[ValueId], attrs: Vec<(&str, Attr)>) -> ValueId {
            self.count += 1;
            let out = self.g.add_value(format!("{}_{}_out", op.to_lowercase(), self.count), None);
            let mut n =
                Node::new(format!("{op}_{}", self.count), op, inputs.iter().map(|&v| Some(v)).collect(), vec![out]);
            for (k, v) in attrs {
                n.attrs.insert(k, v);
            }
            self.g.nodes.push(n);
            out
        }

        pub fn finish(mut self, outputs: &[ValueId]) -> Result<Graph, GraphError> {
            self.g.outputs = outputs.to_vec();
            crate::infer::infer_shapes(&mut self.g)?;
            Ok(self.g)
        }
    }

    /// Deterministic pseudo-random values in [-scale, scale).
    pub fn random(shape: &[usize], seed: u64, scale: f32) -> Tensor {
        let n: usize = shape.iter().product();
        let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let data = (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
            })
            .collect();
        Tensor::new(shape.to_vec(), TensorData::F32(data)).expect("random")
    }

    pub fn random_data(n: usize, seed: u64, scale: f32) -> Vec<f32> {
        random(&[n], seed, scale).as_f32().expect("f32").to_vec()
    }

    pub fn count_op(g: &Graph, op: &str) -> usize {
        g.nodes.iter().filter(|n| n.op == op).count()
    }

    /// Largest difference relative to max(1, |expected|) over all outputs.
    pub fn max_rel_diff(expected: &[Tensor], got: &[Tensor]) -> f32 {
        assert_eq!(expected.len(), got.len(), "output count");
        let mut worst = 0f32;
        for (e, g) in expected.iter().zip(got) {
            assert_eq!(e.shape(), g.shape(), "output shape");
            let (e, g) = (e.as_f32().expect("f32 output"), g.as_f32().expect("f32 output"));
            for (a, b) in e.iter().zip(g) {
                let d = (a - b).abs() / a.abs().max(1.0);
                assert!(!d.is_nan(), "NaN in outputs: {a} vs {b}");
                worst = worst.max(d);
            }
        }
        worst
    }

    /// Runs `pass` through the runner and checks the outputs stay within `tol`
    /// (FP16 nodes emulated when `fp16`). Returns the rewritten graph and stats.
    pub fn check_pass(
        pass: &dyn Pass,
        graph: &Graph,
        cx: &PassContext,
        inputs: &[Tensor],
        tol: f32,
        fp16: bool,
    ) -> (Graph, PassStats) {
        let before = run(graph, inputs, RunOptions::default()).expect("run before");
        let mut after = graph.clone();
        let stats = run_pass(pass, &mut after, cx).expect("pass");
        let got = run(&after, inputs, RunOptions { emulate_fp16: fp16 }).expect("run after");
        let diff = max_rel_diff(&before, &got);
        assert!(diff <= tol, "outputs differ by {diff} (tolerance {tol})");
        (after, stats)
    }
}
