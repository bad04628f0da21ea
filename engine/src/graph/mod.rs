//! kiln's graph IR: values (typed, possibly constant) and nodes in topological
//! order. Import fills it from ONNX, passes rewrite it, the reference executor
//! runs it and a plan file stores it.

mod attr;
mod dim;
mod error;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

pub use attr::{Attr, Attrs};
pub use dim::{Dim, Shape, eval_shape, fixed_shape, numel, shape_string};
pub use error::{GraphError, NodeIssue};

use crate::{DType, Tensor};

/// Index of a value in [`Graph::values`].
pub type ValueId = usize;

/// Static type of a value: element type and, when inference knows it, its shape.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ValueType {
    #[serde(with = "dtype_serde")]
    pub dtype: DType,
    /// `None` when even the rank is unknown.
    pub shape: Option<Shape>,
}

impl ValueType {
    pub fn new(dtype: DType, shape: Shape) -> Self {
        Self { dtype, shape: Some(shape) }
    }

    pub fn rank(&self) -> Option<usize> {
        self.shape.as_ref().map(Vec::len)
    }
}

/// Numeric precision a node computes in. The FP16 pass sets `F16`; everything
/// starts as `F32`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum Precision {
    #[default]
    F32,
    F16,
}

/// A tensor flowing through the graph.
#[derive(Debug, Clone, Default)]
pub struct Value {
    pub name: String,
    pub ty: Option<ValueType>,
    /// Weights and folded constants.
    pub constant: Option<Arc<Tensor>>,
    /// Known contents of a small integer tensor whose entries may be symbolic,
    /// e.g. `Shape(x)` = `[batch, seq, 384]`: what shape-subgraph folding reads.
    pub sym: Option<Vec<Dim>>,
    /// Precision the weight is stored in by a plan (`F16` after the FP16 pass).
    pub storage: Precision,
}

/// One operator application. `op` is the ONNX op type, or `kiln.*` for fused ops.
#[derive(Debug, Clone)]
pub struct Node {
    pub name: String,
    pub op: String,
    /// `None` marks an omitted optional input.
    pub inputs: Vec<Option<ValueId>>,
    pub outputs: Vec<ValueId>,
    pub attrs: Attrs,
    pub precision: Precision,
    /// Kernel chosen by a device builder (empty until then).
    pub kernel: String,
}

impl Node {
    pub fn new(
        name: impl Into<String>,
        op: impl Into<String>,
        inputs: Vec<Option<ValueId>>,
        outputs: Vec<ValueId>,
    ) -> Self {
        Self {
            name: name.into(),
            op: op.into(),
            inputs,
            outputs,
            attrs: Attrs::new(),
            precision: Precision::F32,
            kernel: String::new(),
        }
    }

    pub fn with_attr(mut self, name: &str, value: Attr) -> Self {
        self.attrs.insert(name.to_string(), value);
        self
    }

    /// The i-th input, if present.
    pub fn input(&self, i: usize) -> Option<ValueId> {
        self.inputs.get(i).copied().flatten()
    }
}

#[derive(Debug, Clone, Default)]
pub struct Graph {
    pub name: String,
    pub opset: i64,
    pub values: Vec<Value>,
    pub nodes: Vec<Node>,
    pub inputs: Vec<ValueId>,
    pub outputs: Vec<ValueId>,
}

impl Graph {
    pub fn new(name: impl Into<String>, opset: i64) -> Self {
        Self { name: name.into(), opset, ..Self::default() }
    }

    pub fn value(&self, id: ValueId) -> &Value {
        &self.values[id]
    }

    pub fn add_value(&mut self, name: impl Into<String>, ty: Option<ValueType>) -> ValueId {
        self.values.push(Value { name: name.into(), ty, ..Value::default() });
        self.values.len() - 1
    }

    pub fn add_constant(&mut self, name: impl Into<String>, tensor: Tensor) -> ValueId {
        let ty = ValueType::new(tensor.dtype(), fixed_shape(tensor.shape()));
        let id = self.add_value(name, Some(ty));
        self.values[id].constant = Some(Arc::new(tensor));
        id
    }

    /// A value name not yet used, derived from `hint`.
    pub fn fresh_name(&self, hint: &str) -> String {
        let taken: HashSet<&str> = self.values.iter().map(|v| v.name.as_str()).collect();
        if !taken.contains(hint) {
            return hint.to_string();
        }
        (1..).map(|i| format!("{hint}_{i}")).find(|n| !taken.contains(n.as_str())).unwrap_or_default()
    }

    pub fn constant(&self, id: ValueId) -> Option<&Tensor> {
        self.values[id].constant.as_deref()
    }

    pub fn value_type(&self, id: ValueId) -> Option<&ValueType> {
        self.values[id].ty.as_ref()
    }

    pub fn shape(&self, id: ValueId) -> Option<&Shape> {
        self.values[id].ty.as_ref().and_then(|t| t.shape.as_ref())
    }

    /// Index of the node producing each value.
    pub fn producers(&self) -> HashMap<ValueId, usize> {
        let mut map = HashMap::new();
        for (i, n) in self.nodes.iter().enumerate() {
            for &o in &n.outputs {
                map.insert(o, i);
            }
        }
        map
    }

    /// Indices of the nodes reading each value (a node reading twice appears twice).
    pub fn consumers(&self) -> HashMap<ValueId, Vec<usize>> {
        let mut map: HashMap<ValueId, Vec<usize>> = HashMap::new();
        for (i, n) in self.nodes.iter().enumerate() {
            for v in n.inputs.iter().flatten() {
                map.entry(*v).or_default().push(i);
            }
        }
        map
    }

    pub fn is_output(&self, id: ValueId) -> bool {
        self.outputs.contains(&id)
    }

    /// Number of readers of `id`, graph outputs counted as readers.
    pub fn use_count(&self, id: ValueId) -> usize {
        let nodes = self.nodes.iter().flat_map(|n| n.inputs.iter().flatten()).filter(|&&v| v == id).count();
        nodes + self.outputs.iter().filter(|&&v| v == id).count()
    }

    /// Replaces every read of `from` (nodes and graph outputs keep their names:
    /// a graph output is renamed so clients still see the original name).
    pub fn replace_uses(&mut self, from: ValueId, to: ValueId) {
        for n in &mut self.nodes {
            for v in n.inputs.iter_mut().flatten() {
                if *v == from {
                    *v = to;
                }
            }
        }
        if self.outputs.contains(&from) {
            for o in &mut self.outputs {
                if *o == from {
                    *o = to;
                }
            }
            let name = std::mem::take(&mut self.values[from].name);
            self.values[from].name = format!("{name}__replaced");
            self.values[to].name = name;
        }
    }

    /// Restores topological order after passes appended or rewired nodes.
    /// Stable: nodes already in order keep their relative order.
    pub fn toposort(&mut self) -> Result<(), GraphError> {
        let producers = self.producers();
        let mut state = vec![0u8; self.nodes.len()]; // 0 new, 1 on stack, 2 done
        let mut order = Vec::with_capacity(self.nodes.len());
        for start in 0..self.nodes.len() {
            if state[start] != 0 {
                continue;
            }
            let mut stack = vec![(start, 0usize)];
            state[start] = 1;
            while let Some((n, next)) = stack.pop() {
                let inputs: Vec<ValueId> = self.nodes[n].inputs.iter().flatten().copied().collect();
                if let Some(&v) = inputs.get(next) {
                    stack.push((n, next + 1));
                    if let Some(&p) = producers.get(&v) {
                        match state[p] {
                            0 => {
                                state[p] = 1;
                                stack.push((p, 0));
                            }
                            1 => {
                                return Err(GraphError::Invalid(format!("cycle through node {}", self.nodes[p].name)));
                            }
                            _ => {}
                        }
                    }
                } else {
                    state[n] = 2;
                    order.push(n);
                }
            }
        }
        let mut old: Vec<Option<Node>> = std::mem::take(&mut self.nodes).into_iter().map(Some).collect();
        self.nodes = order.into_iter().filter_map(|i| old[i].take()).collect();
        Ok(())
    }

    /// Drops values no node, input or output refers to, renumbering the rest.
    pub fn compact(&mut self) {
        let mut used = vec![false; self.values.len()];
        for &v in self.inputs.iter().chain(&self.outputs) {
            used[v] = true;
        }
        for n in &self.nodes {
            for &v in n.inputs.iter().flatten().chain(&n.outputs) {
                used[v] = true;
            }
        }
        let mut remap = vec![usize::MAX; self.values.len()];
        let mut kept = Vec::new();
        for (i, v) in std::mem::take(&mut self.values).into_iter().enumerate() {
            if used[i] {
                remap[i] = kept.len();
                kept.push(v);
            }
        }
        self.values = kept;
        for v in self.inputs.iter_mut().chain(self.outputs.iter_mut()) {
            *v = remap[*v];
        }
        for n in &mut self.nodes {
            for v in n.inputs.iter_mut().flatten().chain(n.outputs.iter_mut()) {
                *v = remap[*v];
            }
        }
    }

    /// Count of nodes per op type, for reports.
    pub fn op_histogram(&self) -> Vec<(String, usize)> {
        let mut map: HashMap<&str, usize> = HashMap::new();
        for n in &self.nodes {
            *map.entry(n.op.as_str()).or_default() += 1;
        }
        let mut v: Vec<(String, usize)> = map.into_iter().map(|(k, c)| (k.to_string(), c)).collect();
        v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        v
    }

    /// Bytes of all constant tensors, as stored (FP16 storage counts 2 bytes).
    pub fn weight_bytes(&self) -> usize {
        self.values
            .iter()
            .filter_map(|v| {
                let t = v.constant.as_ref()?;
                let size = match (v.storage, t.dtype()) {
                    (Precision::F16, DType::F32) => 2,
                    (_, d) => d.size_of().unwrap_or(1),
                };
                Some(t.shape().iter().product::<usize>() * size)
            })
            .sum()
    }
}

/// `DType` lives in the tensor module without serde; plans store its KServe name.
pub mod dtype_serde {
    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    use crate::DType;

    pub fn serialize<S: Serializer>(d: &DType, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(d.name())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<DType, D::Error> {
        let name = String::deserialize(d)?;
        DType::from_name(&name).ok_or_else(|| D::Error::custom(format!("unknown dtype {name}")))
    }
}
