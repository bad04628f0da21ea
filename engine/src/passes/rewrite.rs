//! Matching and rewriting helpers shared by the passes: an [`Index`] of who
//! produces and reads each value, scalar and per-channel constant views,
//! activation and epilogue absorption for the fused ops, and the two ways a
//! pass rewrites the graph.
//!
//! - In place (BN folding, conv/dense fusion, movement): a pass edits nodes as
//!   it walks, records the nodes it absorbed in a `dead` set and drops them at
//!   the end with [`remove_nodes`]. Its matches ask [`Index::only_reader`], which
//!   skips readers already absorbed.
//! - Over a snapshot (LayerNorm, GELU, attention): every match is found first,
//!   then a [`Rewriter`] applies them all at once. Matches never share a node
//!   (the rewriter refuses overlaps), so the snapshot stays valid for all of them.

use std::collections::{BTreeMap, HashMap, HashSet};

use super::PassStats;
use crate::graph::{Attr, Graph, GraphError, Node, ValueId};
use crate::ops::util::{f32s, tensor_f32};
use crate::{DType, Tensor, TensorData};

/// Producers and readers of every value of a graph snapshot.
#[derive(Debug)]
pub(super) struct Index {
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
    /// nothing else does and `v` is not a graph output. Snapshot matchers use
    /// this: a pattern may read a value twice by design, as in `x · x`.
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

    /// For in-place rewrites: the node reading `v` through exactly one input
    /// slot, when `v` is not a graph output and that node has not been absorbed
    /// (`dead`) yet. The condition for fusing across `v`: folding one use of `v`
    /// into its producer must leave no other use behind.
    pub fn only_reader(&self, v: ValueId, dead: &HashSet<usize>) -> Option<usize> {
        if self.is_output(v) {
            return None;
        }
        match self.readers(v) {
            &[r] if !dead.contains(&r) => Some(r),
            _ => None,
        }
    }

    /// [`Graph::replace_uses`], keeping the index in step: the readers of
    /// `from` (and its graph-output role) move to `to`.
    pub fn replace_uses(&mut self, g: &mut Graph, from: ValueId, to: ValueId) {
        g.replace_uses(from, to);
        let moved = self.readers.remove(&from).unwrap_or_default();
        self.readers.insert(to, moved);
        if self.outputs.remove(&from) {
            self.outputs.insert(to);
        }
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

/// The FP32 constant behind `v`, if it is one.
pub(super) fn const_f32(graph: &Graph, v: ValueId) -> Option<&Tensor> {
    graph.constant(v).filter(|t| t.dtype() == DType::F32)
}

/// Whether `v` is an FP32 tensor.
pub(super) fn is_f32(g: &Graph, v: ValueId) -> bool {
    g.value_type(v).is_some_and(|t| t.dtype == DType::F32)
}

/// The value of a one-element numeric constant (any rank).
pub(super) fn scalar(g: &Graph, v: ValueId) -> Option<f64> {
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
pub(super) fn near(x: f64, target: f64) -> bool {
    (x - target).abs() <= 1e-4 * target.abs().max(1e-12)
}

/// Whether `v` is a one-element constant close to `target`.
pub(super) fn is_scalar(g: &Graph, v: ValueId, target: f64) -> bool {
    scalar(g, v).is_some_and(|x| near(x, target))
}

/// For a two-input node with one scalar-constant operand: the other operand
/// and the scalar. The constant may be on either side only for commutative
/// ops (Add, Mul); Sub and Div take it on the right.
pub(super) fn scalar_operand(g: &Graph, node: &Node) -> Option<(ValueId, f64)> {
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
pub(super) fn other_input(node: &Node, v: ValueId) -> Option<ValueId> {
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

/// A constant that only varies along `axis` of a result of rank `rank` with
/// `channels` entries on that axis (scalars included), expanded to one value per
/// channel. `None` when adding it would broadcast along any other axis.
pub(super) fn per_channel(t: &Tensor, rank: usize, axis: usize, channels: usize) -> Option<Vec<f32>> {
    let dims = t.shape();
    if dims.len() > rank || t.dtype() != DType::F32 {
        return None;
    }
    let offset = rank - dims.len();
    for (j, &d) in dims.iter().enumerate() {
        let ok = if j + offset == axis { d == 1 || d == channels } else { d == 1 };
        if !ok {
            return None;
        }
    }
    let v = f32s(t).ok()?;
    match v.len() {
        n if n == channels => Some(v.to_vec()),
        1 => Some(vec![v[0]; channels]),
        _ => None,
    }
}

/// The bias of `node` at input `slot` as values (zeros without one); `None`
/// if it is not a constant of `channels` FP32 values.
pub(super) fn bias_or_zeros(graph: &Graph, node: &Node, slot: usize, channels: usize) -> Option<Vec<f32>> {
    match node.input(slot) {
        None => Some(vec![0.0; channels]),
        Some(b) => f32s(const_f32(graph, b)?).ok().filter(|v| v.len() == channels).map(<[f32]>::to_vec),
    }
}

/// An activation a fused op can take over.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Activation {
    /// Value of the fused op's `activation` attribute.
    pub name: &'static str,
    /// Bounds for `clip`.
    pub clip: Option<(f32, f32)>,
    /// Nodes the activation consists of (absorbed by the fusion).
    pub nodes: Vec<usize>,
    /// The activation's result, which the fused op produces instead.
    pub output: ValueId,
    /// For report notes.
    pub label: &'static str,
}

/// The activation applied to `v` (and nothing else reading `v`), if it is one of
/// `allowed`. Recognises Relu, Sigmoid, Tanh, Gelu, Clip with constant bounds
/// and x·Sigmoid(x) (silu).
pub(super) fn match_activation(
    graph: &Graph,
    idx: &Index,
    dead: &HashSet<usize>,
    v: ValueId,
    allowed: &[&str],
) -> Option<Activation> {
    let act = match idx.only_reader(v, dead) {
        Some(r) => single_node_activation(graph, r)?,
        None => match_silu(graph, idx, dead, v)?,
    };
    allowed.contains(&act.name).then_some(act)
}

fn single_node_activation(graph: &Graph, r: usize) -> Option<Activation> {
    let node = &graph.nodes[r];
    let &[output] = node.outputs.as_slice() else { return None };
    let (name, label, clip) = match node.op.as_str() {
        "Relu" => ("relu", "Relu", None),
        "Sigmoid" => ("sigmoid", "Sigmoid", None),
        "Tanh" => ("tanh", "Tanh", None),
        "Gelu" => match node.attrs.string("approximate", "none").ok()?.as_str() {
            "none" => ("gelu", "Gelu", None),
            "tanh" => ("gelu_tanh", "Gelu", None),
            _ => return None,
        },
        "Clip" => ("clip", "Clip", Some(clip_bounds(graph, node)?)),
        _ => return None,
    };
    Some(Activation { name, clip, nodes: vec![r], output, label })
}

/// Clip's bounds: FP32 scalar constant inputs (opset ≥ 11; ONNX gives them the
/// input's type) or attributes (older form). Missing bounds are infinite (plans
/// store non-finite floats). An inverted or NaN range is not fused: ONNX maps
/// everything to max there, which the fused activation does not express.
fn clip_bounds(graph: &Graph, node: &Node) -> Option<(f32, f32)> {
    let bound = |i: usize, attr: &str, default: f32| -> Option<f32> {
        match node.input(i) {
            // An FP32 value round-trips through f64 exactly.
            Some(v) => const_f32(graph, v).and(scalar(graph, v)).map(|x| x as f32),
            None => node.attrs.float(attr, default).ok(),
        }
    };
    let lo = bound(1, "min", f32::NEG_INFINITY)?;
    let hi = bound(2, "max", f32::INFINITY)?;
    (lo <= hi).then_some((lo, hi))
}

/// `Mul(v, Sigmoid(v))` in either operand order, with nothing else reading `v`
/// or the sigmoid.
fn match_silu(graph: &Graph, idx: &Index, dead: &HashSet<usize>, v: ValueId) -> Option<Activation> {
    if idx.is_output(v) {
        return None;
    }
    let &[a, b] = idx.readers(v) else { return None };
    if a == b || dead.contains(&a) || dead.contains(&b) {
        return None;
    }
    let (s, m) = if graph.nodes[a].op == "Sigmoid" { (a, b) } else { (b, a) };
    let (sig, mul) = (&graph.nodes[s], &graph.nodes[m]);
    if sig.op != "Sigmoid" || mul.op != "Mul" || sig.inputs.as_slice() != [Some(v)] {
        return None;
    }
    let &[sig_out] = sig.outputs.as_slice() else { return None };
    let &[output] = mul.outputs.as_slice() else { return None };
    if other_input(mul, v) != Some(sig_out) || idx.only_reader(sig_out, dead) != Some(m) {
        return None;
    }
    Some(Activation { name: "silu", clip: None, nodes: vec![s, m], output, label: "SiLU" })
}

/// What a fused op with inputs `(X, W, bias?, Z?)` and an `activation`
/// attribute (FusedConv, Dense) may take over from the chain after it.
pub(super) struct Epilogue<'a> {
    /// The activations the op implements ([`Activation::name`]).
    pub activations: &'a [&'a str],
    /// Output channels: the length of the bias.
    pub channels: usize,
    /// Rank of the output and its channel axis: an added constant that varies
    /// only along that axis is a bias. `None` when no constant is (NHWC conv,
    /// whose channel axis has moved).
    pub bias_axis: Option<(usize, usize)>,
    /// Whether `z` may become the residual input of an op whose current output
    /// is `out`; asked for every added operand that is not a bias.
    pub residual: &'a dyn Fn(&Graph, ValueId, ValueId) -> bool,
}

/// Absorbs the chain after fused op `i` while each link has exactly one reader:
/// constant Adds into the bias, one Add into the residual input `Z`, and a final
/// activation; absorbed nodes go to `dead`. Returns the labels of what it took
/// (`Bias`, `Add`, the activation's label). The caller checks that `i` has an
/// output and no activation yet.
pub(super) fn absorb_epilogue(
    graph: &mut Graph,
    idx: &Index,
    dead: &mut HashSet<usize>,
    i: usize,
    e: &Epilogue<'_>,
) -> Result<Vec<&'static str>, GraphError> {
    let node = &graph.nodes[i];
    let start = node.outputs[0];
    let mut bias: Option<Vec<f32>> = None;
    let mut z = node.input(3);
    let mut out = start;
    let mut parts = Vec::new();
    loop {
        if let Some(act) = match_activation(graph, idx, dead, out, e.activations) {
            let node = &mut graph.nodes[i];
            node.attrs.insert("activation", Attr::String(act.name.into()));
            if let Some((lo, hi)) = act.clip {
                node.attrs.insert("clip_min", Attr::Float(lo));
                node.attrs.insert("clip_max", Attr::Float(hi));
            }
            dead.extend(&act.nodes);
            out = act.output;
            parts.push(act.label);
            break;
        }
        let Some(r) = idx.only_reader(out, dead) else { break };
        let add = &graph.nodes[r];
        let Some(other) = other_input(add, out).filter(|_| add.op == "Add" && add.outputs.len() == 1) else { break };
        let extra = match (graph.constant(other), e.bias_axis) {
            (Some(c), Some((rank, axis))) => per_channel(c, rank, axis, e.channels),
            _ => None,
        };
        if let Some(extra) = extra {
            let current = bias.take().or_else(|| bias_or_zeros(graph, &graph.nodes[i], 2, e.channels));
            let Some(b) = current else { break };
            bias = Some(b.iter().zip(&extra).map(|(x, y)| x + y).collect());
            parts.push("Bias");
        } else if z.is_none() && (e.residual)(graph, out, other) {
            z = Some(other);
            parts.push("Add");
        } else {
            break;
        }
        dead.insert(r);
        out = graph.nodes[r].outputs[0];
    }
    if out == start {
        return Ok(parts);
    }
    let bias_id = match bias {
        Some(b) => {
            let node = &graph.nodes[i];
            let t = tensor_f32(vec![e.channels], b)
                .map_err(|err| GraphError::Invalid(format!("{} ({}): {err}", node.name, node.op)))?;
            let hint = format!("{}_bias", node.name);
            Some(new_constant(graph, &hint, t))
        }
        None => graph.nodes[i].input(2),
    };
    let node = &mut graph.nodes[i];
    node.inputs.resize(4, None);
    node.inputs[2] = bias_id;
    node.inputs[3] = z;
    while node.inputs.len() > 2 && node.inputs.last() == Some(&None) {
        node.inputs.pop();
    }
    node.outputs[0] = out;
    Ok(parts)
}

/// The in-place loop of the fusions into ops with an epilogue (conv, dense):
/// `head` turns node `i` into the fused op where it can and names it, as
/// `(label, converted)` (`None`: not a candidate), then `absorb` takes over
/// the chain after it. Notes read like `Conv+Bias+Add+Relu ×16`.
pub(super) fn fuse_in_place(
    graph: &mut Graph,
    mut head: impl FnMut(&mut Graph, usize) -> Option<(&'static str, bool)>,
    absorb: impl Fn(&mut Graph, &Index, &mut HashSet<usize>, usize) -> Result<Vec<&'static str>, GraphError>,
) -> Result<PassStats, GraphError> {
    let idx = Index::new(graph);
    let mut dead = HashSet::new();
    let mut tally = Tally::default();
    let mut rewrites = 0;
    for i in 0..graph.nodes.len() {
        if dead.contains(&i) {
            continue;
        }
        let Some((label, converted)) = head(graph, i) else { continue };
        rewrites += usize::from(converted);
        let before = dead.len();
        let parts = absorb(graph, &idx, &mut dead, i)?;
        rewrites += dead.len() - before;
        if converted || !parts.is_empty() {
            tally.add(std::iter::once(label).chain(parts).collect::<Vec<_>>().join("+"));
        }
    }
    remove_nodes(graph, &dead);
    Ok(PassStats { rewrites, notes: tally.notes() })
}

/// Drops the nodes at the given indices.
pub(super) fn remove_nodes(graph: &mut Graph, dead: &HashSet<usize>) {
    if dead.is_empty() {
        return;
    }
    let nodes = std::mem::take(&mut graph.nodes);
    graph.nodes = nodes.into_iter().enumerate().filter(|(i, _)| !dead.contains(i)).map(|(_, n)| n).collect();
}

/// Adds a constant under a fresh name derived from `hint`.
pub(super) fn new_constant(graph: &mut Graph, hint: &str, tensor: Tensor) -> ValueId {
    let name = graph.fresh_name(hint);
    graph.add_constant(name, tensor)
}

/// Connected groups of the nodes `member` accepts, two members joined when
/// one produces a value among the other's `links`. Each group lists its nodes
/// in graph order; the groups are sorted, so callers see a stable order.
pub(super) fn components(
    g: &Graph,
    member: impl Fn(usize) -> bool,
    links: impl Fn(usize) -> Vec<ValueId>,
) -> Vec<Vec<usize>> {
    fn find(parent: &mut [usize], mut i: usize) -> usize {
        while parent[i] != i {
            parent[i] = parent[parent[i]];
            i = parent[i];
        }
        i
    }
    let mut parent: Vec<usize> = (0..g.nodes.len()).collect();
    let producers = g.producers();
    for i in (0..g.nodes.len()).filter(|&i| member(i)) {
        for v in links(i) {
            if let Some(&p) = producers.get(&v)
                && member(p)
            {
                let (a, b) = (find(&mut parent, i), find(&mut parent, p));
                parent[a] = b;
            }
        }
    }
    let mut groups: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for i in (0..g.nodes.len()).filter(|&i| member(i)) {
        let r = find(&mut parent, i);
        groups.entry(r).or_default().push(i);
    }
    let mut out: Vec<Vec<usize>> = groups.into_values().collect();
    out.sort();
    out
}

/// Counts of fusion patterns, rendered as report notes like `Conv+Add+Relu ×16`.
#[derive(Debug, Default)]
pub(super) struct Tally(BTreeMap<String, usize>);

impl Tally {
    pub fn add(&mut self, label: String) {
        *self.0.entry(label).or_default() += 1;
    }

    pub fn notes(self) -> Vec<String> {
        let mut v: Vec<(String, usize)> = self.0.into_iter().collect();
        v.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        v.into_iter().map(|(k, n)| format!("{k} ×{n}")).collect()
    }
}

/// A node outside a fused group to delete: its only reader, at input `slot`,
/// reads `source` (the deleted node's own input) instead.
#[derive(Debug, Clone, Copy)]
pub(super) struct Bypass {
    pub node: usize,
    pub reader: usize,
    pub slot: usize,
    pub source: ValueId,
}

/// Collects fusions over one snapshot and applies them together.
#[derive(Debug)]
pub(super) struct Rewriter {
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
