//! The JSON header: build settings and the graph structure, with constants
//! replaced by references into the weight blob. Loading checks every id,
//! offset and length before building the graph.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use half::f16;
use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::{BuildSettings, blob};
use crate::graph::{Attr, Attrs, Dim, Graph, Node, Precision, Value, ValueId, ValueType};
use crate::{DType, Tensor, TensorData};

#[derive(Debug, Serialize, Deserialize)]
pub struct Header {
    pub settings: BuildSettings,
    pub graph: GraphRec,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct GraphRec {
    name: String,
    opset: i64,
    values: Vec<ValueRec>,
    nodes: Vec<NodeRec>,
    inputs: Vec<ValueId>,
    outputs: Vec<ValueId>,
}

#[derive(Debug, Serialize, Deserialize)]
struct ValueRec {
    name: String,
    ty: Option<ValueType>,
    sym: Option<Vec<Dim>>,
    storage: Precision,
    constant: Option<BlobRef>,
}

/// Where a constant's elements are in the blob. `stored` differs from
/// `dtype` only for FP32 weights kept as FP16.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BlobRef {
    pub dtype: String,
    pub stored: String,
    pub shape: Vec<usize>,
    pub offset: u64,
    pub bytes: u64,
}

#[derive(Debug, Serialize, Deserialize)]
struct NodeRec {
    name: String,
    op: String,
    inputs: Vec<Option<ValueId>>,
    outputs: Vec<ValueId>,
    attrs: BTreeMap<String, AttrRec>,
    precision: Precision,
    kernel: String,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum AttrRec {
    Int(i64),
    Ints(Vec<i64>),
    Float(JsonF32),
    Floats(Vec<JsonF32>),
    String(String),
    Strings(Vec<String>),
    Tensor(TensorRec),
}

/// An attribute tensor spelled out in the header; `values` is read as `dtype`.
#[derive(Debug, Serialize, Deserialize)]
struct TensorRec {
    dtype: String,
    shape: Vec<usize>,
    values: serde_json::Value,
}

/// JSON has no NaN or infinities, and an f32 printed in shortest form can be
/// read back one ulp off through f64; the exact f64 of the f32 round-trips, and
/// non-finite values are spelled as strings.
#[derive(Debug, Clone, Copy)]
struct JsonF32(f32);

impl Serialize for JsonF32 {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        JsonF64(f64::from(self.0)).serialize(s)
    }
}

impl<'de> Deserialize<'de> for JsonF32 {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        JsonF64::deserialize(d).map(|v| JsonF32(v.0 as f32))
    }
}

#[derive(Debug, Clone, Copy)]
struct JsonF64(f64);

impl Serialize for JsonF64 {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.0 {
            x if x.is_finite() => s.serialize_f64(x),
            x if x.is_nan() => s.serialize_str("nan"),
            x if x > 0.0 => s.serialize_str("inf"),
            _ => s.serialize_str("-inf"),
        }
    }
}

impl<'de> Deserialize<'de> for JsonF64 {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Repr {
            Num(f64),
            Str(String),
        }
        match Repr::deserialize(d)? {
            Repr::Num(x) => Ok(JsonF64(x)),
            Repr::Str(s) => match s.as_str() {
                "nan" => Ok(JsonF64(f64::NAN)),
                "inf" => Ok(JsonF64(f64::INFINITY)),
                "-inf" => Ok(JsonF64(f64::NEG_INFINITY)),
                _ => Err(D::Error::custom(format!("{s:?} is not a number"))),
            },
        }
    }
}

/// Header records for `graph`, appending its constants to `blob`.
pub fn graph_to_rec(graph: &Graph, blob: &mut Vec<u8>) -> GraphRec {
    let values = graph
        .values
        .iter()
        .map(|v| {
            let constant = v.constant.as_ref().map(|t| {
                let stored = match (v.storage, t.dtype()) {
                    (Precision::F16, DType::F32) => DType::F16,
                    (_, d) => d,
                };
                let (offset, bytes) = blob::write(blob, t, stored);
                BlobRef {
                    dtype: t.dtype().name().into(),
                    stored: stored.name().into(),
                    shape: t.shape().to_vec(),
                    offset: offset as u64,
                    bytes: bytes as u64,
                }
            });
            ValueRec { name: v.name.clone(), ty: v.ty.clone(), sym: v.sym.clone(), storage: v.storage, constant }
        })
        .collect();
    let nodes = graph
        .nodes
        .iter()
        .map(|n| NodeRec {
            name: n.name.clone(),
            op: n.op.clone(),
            inputs: n.inputs.clone(),
            outputs: n.outputs.clone(),
            attrs: n.attrs.iter().map(|(k, a)| (k.clone(), attr_to_rec(a))).collect(),
            precision: n.precision,
            kernel: n.kernel.clone(),
        })
        .collect();
    GraphRec {
        name: graph.name.clone(),
        opset: graph.opset,
        values,
        nodes,
        inputs: graph.inputs.clone(),
        outputs: graph.outputs.clone(),
    }
}

fn attr_to_rec(a: &Attr) -> AttrRec {
    match a {
        Attr::Int(v) => AttrRec::Int(*v),
        Attr::Ints(v) => AttrRec::Ints(v.clone()),
        Attr::Float(v) => AttrRec::Float(JsonF32(*v)),
        Attr::Floats(v) => AttrRec::Floats(v.iter().map(|&x| JsonF32(x)).collect()),
        Attr::String(v) => AttrRec::String(v.clone()),
        Attr::Strings(v) => AttrRec::Strings(v.clone()),
        Attr::Tensor(t) => AttrRec::Tensor(tensor_to_rec(t)),
    }
}

fn tensor_to_rec(t: &Tensor) -> TensorRec {
    use serde_json::json;
    let values = match t.data() {
        TensorData::Bool(v) => json!(v),
        TensorData::U8(v) => json!(v),
        TensorData::I8(v) => json!(v),
        TensorData::I16(v) => json!(v),
        TensorData::I32(v) => json!(v),
        TensorData::I64(v) => json!(v),
        TensorData::F16(v) => json!(v.iter().map(|x| JsonF32(x.to_f32())).collect::<Vec<_>>()),
        TensorData::F32(v) => json!(v.iter().map(|&x| JsonF32(x)).collect::<Vec<_>>()),
        TensorData::F64(v) => json!(v.iter().map(|&x| JsonF64(x)).collect::<Vec<_>>()),
        TensorData::Bytes(v) => json!(v),
    };
    TensorRec { dtype: t.dtype().name().into(), shape: t.shape().to_vec(), values }
}

fn rec_to_tensor(r: TensorRec) -> Result<Tensor, String> {
    fn vals<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> Result<Vec<T>, String> {
        serde_json::from_value(v).map_err(|e| e.to_string())
    }
    let dtype = parse_dtype(&r.dtype)?;
    let data = match dtype {
        DType::Bool => TensorData::Bool(vals(r.values)?),
        DType::U8 => TensorData::U8(vals(r.values)?),
        DType::I8 => TensorData::I8(vals(r.values)?),
        DType::I16 => TensorData::I16(vals(r.values)?),
        DType::I32 => TensorData::I32(vals(r.values)?),
        DType::I64 => TensorData::I64(vals(r.values)?),
        DType::F16 => TensorData::F16(vals::<JsonF32>(r.values)?.into_iter().map(|x| f16::from_f32(x.0)).collect()),
        DType::F32 => TensorData::F32(vals::<JsonF32>(r.values)?.into_iter().map(|x| x.0).collect()),
        DType::F64 => TensorData::F64(vals::<JsonF64>(r.values)?.into_iter().map(|x| x.0).collect()),
        DType::Bytes => TensorData::Bytes(vals(r.values)?),
    };
    Tensor::new(r.shape, data).map_err(|e| e.to_string())
}

fn parse_dtype(name: &str) -> Result<DType, String> {
    DType::from_name(name).ok_or_else(|| format!("unknown dtype {name:?}"))
}

/// Rebuilds the graph, checking every reference the header makes.
pub fn rec_to_graph(rec: GraphRec, blob_bytes: &[u8]) -> Result<Graph, String> {
    let n_values = rec.values.len();
    let check_id = |id: ValueId, what: &dyn Fn() -> String| {
        if id < n_values { Ok(id) } else { Err(format!("{} refers to value {id}, but there are {n_values}", what())) }
    };
    let mut values = Vec::with_capacity(n_values);
    for v in rec.values {
        let constant = match v.constant {
            None => None,
            Some(r) => {
                let t = constant(&r, v.storage, blob_bytes).map_err(|e| format!("constant {}: {e}", v.name))?;
                Some(Arc::new(t))
            }
        };
        values.push(Value { name: v.name, ty: v.ty, constant, sym: v.sym, storage: v.storage });
    }
    let mut nodes = Vec::with_capacity(rec.nodes.len());
    for n in rec.nodes {
        for v in n.inputs.iter().flatten().chain(&n.outputs) {
            check_id(*v, &|| format!("node {}", n.name))?;
        }
        let mut attrs = Attrs::new();
        for (k, a) in n.attrs {
            let attr = rec_to_attr(a).map_err(|e| format!("node {} attribute {k}: {e}", n.name))?;
            attrs.insert(k, attr);
        }
        nodes.push(Node {
            name: n.name,
            op: n.op,
            inputs: n.inputs,
            outputs: n.outputs,
            attrs,
            precision: n.precision,
            kernel: n.kernel,
        });
    }
    for &v in &rec.inputs {
        check_id(v, &|| "graph input list".into())?;
    }
    for &v in &rec.outputs {
        check_id(v, &|| "graph output list".into())?;
    }
    let graph = Graph { name: rec.name, opset: rec.opset, values, nodes, inputs: rec.inputs, outputs: rec.outputs };
    check_order(&graph)?;
    Ok(graph)
}

fn rec_to_attr(a: AttrRec) -> Result<Attr, String> {
    Ok(match a {
        AttrRec::Int(v) => Attr::Int(v),
        AttrRec::Ints(v) => Attr::Ints(v),
        AttrRec::Float(v) => Attr::Float(v.0),
        AttrRec::Floats(v) => Attr::Floats(v.into_iter().map(|x| x.0).collect()),
        AttrRec::String(v) => Attr::String(v),
        AttrRec::Strings(v) => Attr::Strings(v),
        AttrRec::Tensor(t) => Attr::Tensor(rec_to_tensor(t)?),
    })
}

fn constant(r: &BlobRef, storage: Precision, blob_bytes: &[u8]) -> Result<Tensor, String> {
    let dtype = parse_dtype(&r.dtype)?;
    let stored = parse_dtype(&r.stored)?;
    let expected = match (storage, dtype) {
        (Precision::F16, DType::F32) => DType::F16,
        _ => dtype,
    };
    if stored != expected {
        return Err(format!("{dtype} with {storage:?} storage cannot be stored as {stored}"));
    }
    let offset = usize::try_from(r.offset).map_err(|_| format!("offset {} is out of range", r.offset))?;
    let len = usize::try_from(r.bytes).map_err(|_| format!("length {} is out of range", r.bytes))?;
    if offset % blob::ALIGN != 0 {
        return Err(format!("offset {offset} is not {}-byte aligned", blob::ALIGN));
    }
    let end = offset
        .checked_add(len)
        .filter(|&e| e <= blob_bytes.len())
        .ok_or_else(|| format!("bytes {offset}..+{len} lie outside the {}-byte weight blob", blob_bytes.len()))?;
    blob::read(&blob_bytes[offset..end], dtype, stored, r.shape.clone())
}

/// Every value a node reads is a constant, a graph input or written by an
/// earlier node, and no value is written twice: executors rely on both.
fn check_order(g: &Graph) -> Result<(), String> {
    let mut ready: HashSet<ValueId> = g.inputs.iter().copied().collect();
    ready.extend((0..g.values.len()).filter(|&v| g.values[v].constant.is_some()));
    let mut written: HashSet<ValueId> = HashSet::new();
    for n in &g.nodes {
        if let Some(&v) = n.inputs.iter().flatten().find(|v| !ready.contains(v)) {
            return Err(format!("node {} reads {} before it is computed", n.name, g.values[v].name));
        }
        for &v in &n.outputs {
            if !written.insert(v) || g.inputs.contains(&v) {
                return Err(format!("node {} writes {}, which already has a value", n.name, g.values[v].name));
            }
            ready.insert(v);
        }
    }
    match g.outputs.iter().find(|v| !ready.contains(v)) {
        Some(&v) => Err(format!("graph output {} is never computed", g.values[v].name)),
        None => Ok(()),
    }
}
