//! The reference executor: runs a graph on the CPU op by op with each op's
//! FP32 reference math, optionally rounding FP16 nodes' activations to half
//! precision. It is the oracle every pass and the GPU executor are checked
//! against, not a serving backend.

use std::collections::HashMap;
use std::sync::Arc;

use half::f16;

use crate::graph::{Graph, GraphError, NodeIssue, Precision, ValueId};
use crate::ops::registry;
use crate::quant::Int8Plan;
use crate::{Tensor, TensorData};

#[derive(Debug, Clone, Copy, Default)]
pub struct RunOptions {
    /// Round inputs and outputs of nodes whose precision is FP16 to half
    /// precision, as an FP16 kernel with FP32 accumulation would see them.
    pub emulate_fp16: bool,
}

/// What a run does beyond the graph itself: nodes computed in emulated INT8, and an
/// observer shown every value as it is computed (graph inputs included) — calibration.
#[derive(Default)]
pub struct Hooks<'a> {
    pub int8: Option<&'a Int8Plan>,
    pub observe: Option<&'a mut Observer<'a>>,
}

/// Shown every value of a run as it is computed.
pub type Observer<'a> = dyn FnMut(ValueId, &Tensor) + 'a;

impl std::fmt::Debug for Hooks<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hooks")
            .field("int8_nodes", &self.int8.map_or(0, |p| p.nodes.len()))
            .field("observer", &self.observe.is_some())
            .finish()
    }
}

/// Runs `graph` on `inputs` (in `graph.inputs` order) and returns its outputs.
pub fn run(graph: &Graph, inputs: &[Tensor], opts: RunOptions) -> Result<Vec<Tensor>, GraphError> {
    run_with(graph, inputs, opts, Hooks::default())
}

/// [`run`] with INT8 nodes and/or an observer.
pub fn run_with(
    graph: &Graph,
    inputs: &[Tensor],
    opts: RunOptions,
    mut hooks: Hooks<'_>,
) -> Result<Vec<Tensor>, GraphError> {
    if inputs.len() != graph.inputs.len() {
        return Err(GraphError::Input {
            name: graph.name.clone(),
            reason: format!("expected {} inputs, got {}", graph.inputs.len(), inputs.len()),
        });
    }
    let mut live: HashMap<ValueId, Arc<Tensor>> = HashMap::new();
    for (&id, t) in graph.inputs.iter().zip(inputs) {
        check_input(graph, id, t)?;
        if let Some(observe) = hooks.observe.as_mut() {
            observe(id, t);
        }
        live.insert(id, Arc::new(t.clone()));
    }
    // Last node index reading each value, so intermediates are freed early.
    let mut last_use: HashMap<ValueId, usize> = HashMap::new();
    for (i, n) in graph.nodes.iter().enumerate() {
        for &v in n.inputs.iter().flatten() {
            last_use.insert(v, i);
        }
    }
    let reg = registry();
    // Without an explicit plan, the INT8 nodes are those the graph itself marks.
    let marked = match hooks.int8 {
        Some(_) => None,
        None if graph.nodes.iter().any(|n| n.attrs.get(crate::quant::INPUT_SCALE).is_some()) => {
            Some(Int8Plan::from_graph(graph))
        }
        None => None,
    };
    let int8 = hooks.int8.or(marked.as_ref());
    for (i, node) in graph.nodes.iter().enumerate() {
        let issue = |reason: String| NodeIssue { node: node.name.clone(), op: node.op.clone(), reason };
        let op = reg.get(&node.op).ok_or_else(|| GraphError::Execution(issue("no such op in kiln".into())))?;
        let fp16 = opts.emulate_fp16 && node.precision == Precision::F16;
        let quant = int8.and_then(|p| p.nodes.get(&node.name));
        let mut held: Vec<Option<Arc<Tensor>>> = Vec::with_capacity(node.inputs.len());
        for (j, v) in node.inputs.iter().enumerate() {
            // An INT8 layer reads FP16 activations (input and residual) but keeps its FP32
            // weights and bias: the GPU quantises those itself.
            let round = fp16 && (quant.is_none() || j == 0 || j == 3);
            let t = match v {
                None => None,
                Some(v) => {
                    let t = match graph.values[*v].constant.as_ref() {
                        Some(c) => Arc::clone(c),
                        None => Arc::clone(live.get(v).ok_or_else(|| {
                            GraphError::Execution(issue(format!("input {} was never computed", graph.values[*v].name)))
                        })?),
                    };
                    Some(if round { Arc::new(round_f16(&t)) } else { t })
                }
            };
            held.push(t);
        }
        let refs: Vec<Option<&Tensor>> = held.iter().map(|t| t.as_deref()).collect();
        let outs = match quant {
            Some(q) => crate::quant::int8::eval(node, op, &refs, q).map(|t| vec![t]),
            None => op.eval(node, &refs),
        }
        .map_err(|r| GraphError::Execution(issue(r)))?;
        if outs.len() < node.outputs.len() {
            return Err(GraphError::Execution(issue(format!(
                "produced {} outputs, expected {}",
                outs.len(),
                node.outputs.len()
            ))));
        }
        for (&v, t) in node.outputs.iter().zip(outs) {
            let t = if fp16 { round_f16(&t) } else { t };
            if let Some(observe) = hooks.observe.as_mut() {
                observe(v, &t);
            }
            live.insert(v, Arc::new(t));
        }
        for &v in node.inputs.iter().flatten() {
            if last_use.get(&v) == Some(&i) && !graph.outputs.contains(&v) {
                live.remove(&v);
            }
        }
    }
    graph
        .outputs
        .iter()
        .map(|o| {
            let t = match graph.values[*o].constant.as_ref() {
                Some(c) => Arc::clone(c),
                None => live.get(o).cloned().ok_or_else(|| {
                    GraphError::Invalid(format!("output {} was never computed", graph.values[*o].name))
                })?,
            };
            Ok(Arc::try_unwrap(t).unwrap_or_else(|a| (*a).clone()))
        })
        .collect()
}

fn check_input(graph: &Graph, id: ValueId, t: &Tensor) -> Result<(), GraphError> {
    let v = &graph.values[id];
    let err = |reason: String| GraphError::Input { name: v.name.clone(), reason };
    let Some(ty) = &v.ty else { return Ok(()) };
    if ty.dtype != t.dtype() {
        return Err(err(format!("expected {}, got {}", ty.dtype, t.dtype())));
    }
    if let Some(shape) = &ty.shape {
        if shape.len() != t.shape().len() {
            return Err(err(format!("expected rank {}, got shape {:?}", shape.len(), t.shape())));
        }
        for (d, &n) in shape.iter().zip(t.shape()) {
            if d.as_fixed().is_some_and(|f| f != n as i64) {
                return Err(err(format!("expected shape {}, got {:?}", crate::graph::shape_string(shape), t.shape())));
            }
        }
    }
    Ok(())
}

/// FP32 values rounded to the nearest FP16 (other dtypes unchanged).
pub fn round_f16(t: &Tensor) -> Tensor {
    match t.data() {
        TensorData::F32(v) => {
            let data = v.iter().map(|&x| f16::from_f32(x).to_f32()).collect();
            Tensor::new(t.shape().to_vec(), TensorData::F32(data)).unwrap_or_else(|_| t.clone())
        }
        _ => t.clone(),
    }
}
