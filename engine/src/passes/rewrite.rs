//! Helpers shared by the structural passes: who reads a value, constant views,
//! activation matching for fusions, node removal and report notes.

use std::collections::{BTreeMap, HashMap, HashSet};

use crate::graph::{Graph, Node, ValueId};
use crate::ops::util::f32s;
use crate::{DType, Tensor};

/// Readers of every value, by node index.
pub(super) type Readers = HashMap<ValueId, Vec<usize>>;

/// The only node reading `v`, when `v` is not a graph output and that node has
/// not been absorbed already: the condition for fusing across `v`.
pub(super) fn sole_reader(graph: &Graph, readers: &Readers, dead: &HashSet<usize>, v: ValueId) -> Option<usize> {
    if graph.is_output(v) {
        return None;
    }
    match readers.get(&v).map(Vec::as_slice) {
        Some(&[r]) if !dead.contains(&r) => Some(r),
        _ => None,
    }
}

/// For a two-input node reading `v` once, the other operand.
pub(super) fn other_operand(node: &Node, v: ValueId) -> Option<ValueId> {
    match *node.inputs.as_slice() {
        [Some(a), Some(b)] if a == v && b != v => Some(b),
        [Some(a), Some(b)] if b == v && a != v => Some(a),
        _ => None,
    }
}

/// The FP32 constant behind `v`, if it is one.
pub(super) fn const_f32(graph: &Graph, v: ValueId) -> Option<&Tensor> {
    graph.constant(v).filter(|t| t.dtype() == DType::F32)
}

/// A scalar FP32 constant's value.
pub(super) fn const_scalar(graph: &Graph, v: ValueId) -> Option<f32> {
    let t = const_f32(graph, v)?;
    match f32s(t).ok()? {
        &[x] => Some(x),
        _ => None,
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
    readers: &Readers,
    dead: &HashSet<usize>,
    v: ValueId,
    allowed: &[&str],
) -> Option<Activation> {
    let act = match sole_reader(graph, readers, dead, v) {
        Some(r) => single_node_activation(graph, r)?,
        None => match_silu(graph, readers, dead, v)?,
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

/// Clip's bounds: constant inputs (opset ≥ 11) or attributes (older form).
/// Missing bounds are infinite (plans store non-finite floats). An inverted or
/// NaN range is not fused: ONNX maps everything to max there, which the fused
/// activation does not express.
fn clip_bounds(graph: &Graph, node: &Node) -> Option<(f32, f32)> {
    let bound = |i: usize, attr: &str, default: f32| -> Option<f32> {
        match node.input(i) {
            Some(v) => const_scalar(graph, v),
            None => node.attrs.float(attr, default).ok(),
        }
    };
    let lo = bound(1, "min", f32::NEG_INFINITY)?;
    let hi = bound(2, "max", f32::INFINITY)?;
    (lo <= hi).then_some((lo, hi))
}

/// `Mul(v, Sigmoid(v))` in either operand order, with nothing else reading `v`
/// or the sigmoid.
fn match_silu(graph: &Graph, readers: &Readers, dead: &HashSet<usize>, v: ValueId) -> Option<Activation> {
    if graph.is_output(v) {
        return None;
    }
    let rs = readers.get(&v)?;
    let &[a, b] = rs.as_slice() else { return None };
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
    if other_operand(mul, v) != Some(sig_out) || sole_reader(graph, readers, dead, sig_out) != Some(m) {
        return None;
    }
    Some(Activation { name: "silu", clip: None, nodes: vec![s, m], output, label: "SiLU" })
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

#[cfg(test)]
pub(super) mod testing {
    //! Test support: a deterministic generator, ONNX graph import and the
    //! before/after equivalence check every pass test makes.

    use kiln_onnx::{DataType, Dim, GraphBuilder, OnnxError, attr_float, attr_int, attr_ints};

    use super::super::{Pass, PassContext, PassStats, run_pass};
    use crate::graph::{Graph, shape_string};
    use crate::reference::{RunOptions, run};
    use crate::{DType, Tensor, TensorData};

    /// A tiny LCG: reproducible test data without extra crates.
    #[derive(Debug)]
    pub struct Lcg(u64);

    impl Lcg {
        pub fn new(seed: u64) -> Self {
            Self(seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407))
        }

        pub fn next_u32(&mut self) -> u32 {
            self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (self.0 >> 33) as u32
        }

        /// Uniform in [-1, 1).
        pub fn f32(&mut self) -> f32 {
            (self.next_u32() as f32 / (1u64 << 31) as f32) - 1.0
        }

        /// Uniform in 0..n.
        pub fn below(&mut self, n: usize) -> usize {
            self.next_u32() as usize % n.max(1)
        }

        pub fn vec(&mut self, n: usize) -> Vec<f32> {
            (0..n).map(|_| self.f32()).collect()
        }

        /// Positive values in [lo, lo + 1).
        pub fn positive(&mut self, n: usize, lo: f32) -> Vec<f32> {
            (0..n).map(|_| lo + (self.f32() + 1.0) / 2.0).collect()
        }
    }

    pub type TestResult = Result<(), Box<dyn std::error::Error>>;

    /// ONNX dims: `-1` is the symbolic batch `N`.
    pub fn dims(spec: &[i64]) -> Vec<Dim> {
        spec.iter().map(|&d| if d < 0 { Dim::Symbolic("N".into()) } else { Dim::Fixed(d) }).collect()
    }

    pub fn input(b: &mut GraphBuilder, name: &str, spec: &[i64]) -> Result<String, OnnxError> {
        b.add_input(name, DataType::Float, &dims(spec))?;
        Ok(name.to_string())
    }

    /// A random FP32 initializer named after `hint`.
    pub fn weight(b: &mut GraphBuilder, rng: &mut Lcg, hint: &str, shape: &[i64]) -> Result<String, OnnxError> {
        let n = shape.iter().product::<i64>() as usize;
        let name = b.unique_name(hint);
        b.add_initializer_f32(&name, shape, &rng.vec(n))
    }

    pub fn values(b: &mut GraphBuilder, hint: &str, shape: &[i64], data: &[f32]) -> Result<String, OnnxError> {
        let name = b.unique_name(hint);
        b.add_initializer_f32(&name, shape, data)
    }

    pub fn ints(b: &mut GraphBuilder, hint: &str, data: &[i64]) -> Result<String, OnnxError> {
        let name = b.unique_name(hint);
        b.add_initializer_i64(&name, &[data.len() as i64], data)
    }

    pub fn output(b: &mut GraphBuilder, name: &str) -> Result<(), OnnxError> {
        b.add_output(name, DataType::Float, &[])
    }

    /// A square-kernel Conv with random weights (and bias when asked).
    #[allow(clippy::too_many_arguments)]
    pub fn conv(
        b: &mut GraphBuilder,
        rng: &mut Lcg,
        x: &str,
        cin: i64,
        cout: i64,
        k: i64,
        stride: i64,
        pad: i64,
        group: i64,
        bias: bool,
    ) -> Result<String, OnnxError> {
        let w = weight(b, rng, "w", &[cout, cin / group, k, k])?;
        let mut inputs = vec![x.to_string(), w];
        if bias {
            inputs.push(weight(b, rng, "b", &[cout])?);
        }
        let refs: Vec<&str> = inputs.iter().map(String::as_str).collect();
        b.add_node(
            "Conv",
            &refs,
            vec![
                attr_ints("kernel_shape", &[k, k]),
                attr_ints("strides", &[stride, stride]),
                attr_ints("pads", &[pad, pad, pad, pad]),
                attr_int("group", group),
            ],
        )
    }

    /// BatchNormalization with random statistics.
    pub fn batch_norm(b: &mut GraphBuilder, rng: &mut Lcg, x: &str, c: i64) -> Result<String, OnnxError> {
        let n = c as usize;
        let scale = values(b, "bn_scale", &[c], &rng.positive(n, 0.5))?;
        let bias = weight(b, rng, "bn_bias", &[c])?;
        let mean = weight(b, rng, "bn_mean", &[c])?;
        let var = values(b, "bn_var", &[c], &rng.positive(n, 0.2))?;
        b.add_node("BatchNormalization", &[x, &scale, &bias, &mean, &var], vec![attr_float("epsilon", 1e-3)])
    }

    pub fn import(b: GraphBuilder) -> Result<Graph, String> {
        crate::import::import_model(&b.finish(17), None).map_err(|e| e.to_string())
    }

    pub fn count(graph: &Graph, op: &str) -> usize {
        graph.nodes.iter().filter(|n| n.op == op).count()
    }

    /// Random FP32 inputs for every graph input (symbols bound to `sym_size`).
    pub fn random_inputs(graph: &Graph, sym_size: usize, rng: &mut Lcg) -> Result<Vec<Tensor>, String> {
        graph
            .inputs
            .iter()
            .map(|&id| {
                let ty = graph.value_type(id).ok_or("input without type")?;
                let shape = ty.shape.as_ref().ok_or("input without shape")?;
                let dims: Vec<usize> = shape.iter().map(|d| d.as_fixed().map_or(sym_size, |n| n as usize)).collect();
                let n: usize = dims.iter().product();
                let data = match ty.dtype {
                    DType::F32 => TensorData::F32(rng.vec(n)),
                    DType::I64 => TensorData::I64((0..n).map(|_| rng.below(4) as i64).collect()),
                    d => return Err(format!("no random data for {d} ({})", shape_string(shape))),
                };
                Tensor::new(dims, data).map_err(|e| e.to_string())
            })
            .collect()
    }

    /// Max |a - b| relative to the larger of 1 and the reference's max |b|.
    pub fn rel_error(a: &Tensor, b: &Tensor) -> Result<f32, String> {
        if a.shape() != b.shape() {
            return Err(format!("shape {:?} vs {:?}", a.shape(), b.shape()));
        }
        let (x, y) = match (a.data(), b.data()) {
            (TensorData::F32(x), TensorData::F32(y)) => (x, y),
            (p, q) => return if p == q { Ok(0.0) } else { Err("non-float outputs differ".into()) },
        };
        let scale = y.iter().fold(1.0f32, |m, v| m.max(v.abs()));
        Ok(x.iter().zip(y).fold(0.0f32, |m, (p, q)| m.max((p - q).abs())) / scale)
    }

    /// Runs `pass` on `graph` (in place) and checks the reference outputs on
    /// `inputs` are unchanged within a relative `tol`.
    pub fn check_pass(pass: &dyn Pass, graph: &mut Graph, inputs: &[Tensor], tol: f32) -> Result<PassStats, String> {
        let before = run(graph, inputs, RunOptions::default()).map_err(|e| format!("before: {e}"))?;
        let stats = run_pass(pass, graph, &PassContext::default()).map_err(|e| e.to_string())?;
        let after = run(graph, inputs, RunOptions::default()).map_err(|e| format!("after: {e}"))?;
        if before.len() != after.len() {
            return Err(format!("{} outputs before, {} after", before.len(), after.len()));
        }
        for (i, (a, b)) in after.iter().zip(&before).enumerate() {
            let err = rel_error(a, b).map_err(|e| format!("output {i}: {e}"))?;
            if err > tol {
                return Err(format!("output {i} differs after {}: relative error {err}", pass.name()));
            }
        }
        Ok(stats)
    }
}
