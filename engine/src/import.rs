//! ONNX → kiln IR. Initializers (raw, typed or external data) become constant
//! values, `Constant` nodes are folded on the way in, every node is checked
//! against the registry and all unsupported ones are reported together, then
//! shapes are inferred.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use kiln_onnx::proto::tensor_shape_proto::dimension;
use kiln_onnx::proto::type_proto;
use kiln_onnx::{AttributeProto, AttributeType, DataType, ModelProto, TensorProto};

use crate::graph::{Attr, Attrs, Dim, Graph, GraphError, Node, NodeIssue, ValueId, ValueType};
use crate::ops::registry;
use crate::{DType, Tensor, TensorData, f16};

/// Default-domain opsets the importer accepts.
pub const OPSETS: std::ops::RangeInclusive<i64> = 13..=21;

/// Symbol the first dynamic dimension of every input is named.
pub const BATCH: &str = "batch";
/// Symbol the next dynamic input dimension is named (the sequence of text models).
pub const SEQ: &str = "seq";

/// Reads and imports an ONNX file; external data is resolved next to it.
pub fn import_file(path: &Path) -> Result<Graph, GraphError> {
    let bytes = std::fs::read(path).map_err(|e| GraphError::Io { path: path.to_path_buf(), reason: e.to_string() })?;
    let model = kiln_onnx::decode(&bytes).map_err(|e| GraphError::Onnx(e.to_string()))?;
    import_model(&model, path.parent())
}

/// Imports a decoded model. `base_dir` is where external data files live;
/// `None` refuses external data.
pub fn import_model(model: &ModelProto, base_dir: Option<&Path>) -> Result<Graph, GraphError> {
    let opset = model
        .opset_import
        .iter()
        .find(|o| o.domain.is_empty() || o.domain == "ai.onnx")
        .map(|o| o.version)
        .ok_or_else(|| GraphError::Onnx("the model imports no default-domain opset".into()))?;
    if !OPSETS.contains(&opset) {
        return Err(GraphError::Onnx(format!(
            "opset {opset} is not supported (kiln imports opsets {}–{})",
            OPSETS.start(),
            OPSETS.end()
        )));
    }
    let gp = model.graph.as_ref().ok_or_else(|| GraphError::Onnx("the model has no graph".into()))?;
    let mut g = Graph::new(if gp.name.is_empty() { "model" } else { &gp.name }, opset);
    let mut ids: HashMap<String, ValueId> = HashMap::new();

    for init in &gp.initializer {
        let t = tensor_from_proto(init, base_dir)?;
        let id = g.add_constant(init.name.clone(), t);
        ids.insert(init.name.clone(), id);
    }
    let mut names = DimNames::default();
    for vi in &gp.input {
        if ids.contains_key(&vi.name) {
            continue; // an initializer also listed as an input (IR < 4): a weight, not a feed
        }
        let ty = value_type(vi.r#type.as_ref(), &mut names)
            .map_err(|r| GraphError::Onnx(format!("input {}: {r}", vi.name)))?;
        let id = g.add_value(vi.name.clone(), Some(ty));
        ids.insert(vi.name.clone(), id);
        g.inputs.push(id);
    }

    let reg = registry();
    let mut issues = Vec::new();
    for (i, np) in gp.node.iter().enumerate() {
        let name = if np.name.is_empty() { format!("{}_{i}", np.op_type) } else { np.name.clone() };
        let op = if np.domain.is_empty() || np.domain == "ai.onnx" {
            np.op_type.clone()
        } else {
            format!("{}.{}", np.domain, np.op_type)
        };
        let attrs = match attrs_from_proto(&np.attribute, base_dir) {
            Ok(a) => a,
            Err(reason) => {
                issues.push(NodeIssue { node: name, op, reason });
                continue;
            }
        };
        if op == "Constant" {
            match constant_value(&attrs) {
                Ok(t) => {
                    let out = np.output.first().cloned().unwrap_or_default();
                    let id = g.add_constant(out.clone(), t);
                    ids.insert(out, id);
                }
                Err(reason) => issues.push(NodeIssue { node: name, op, reason }),
            }
            continue;
        }
        let mut inputs = Vec::with_capacity(np.input.len());
        let issues_before = issues.len();
        for inp in &np.input {
            if inp.is_empty() {
                inputs.push(None);
            } else if let Some(&id) = ids.get(inp) {
                inputs.push(Some(id));
            } else {
                issues.push(NodeIssue {
                    node: name.clone(),
                    op: op.clone(),
                    reason: format!("input {inp} is never produced"),
                });
                inputs.push(None);
            }
        }
        // Exporters write skipped optional outputs as empty names (LayerNormalization's
        // Mean/InvStdDev); trailing ones are simply not produced.
        let used_outputs = np.output.iter().rposition(|o| !o.is_empty()).map_or(0, |i| i + 1);
        let outputs = np.output[..used_outputs]
            .iter()
            .map(|o| {
                let id = g.add_value(o.clone(), None);
                if !o.is_empty() {
                    ids.insert(o.clone(), id);
                }
                id
            })
            .collect();
        let mut node = Node::new(name.clone(), op.clone(), inputs, outputs);
        node.attrs = attrs;
        match reg.get(&op) {
            // Every op kiln has produces something; passes rely on outputs[0] existing.
            _ if node.outputs.is_empty() => {
                issues.push(NodeIssue { node: name, op, reason: "node has no outputs".into() })
            }
            None => issues.push(NodeIssue { node: name, op, reason: "op not supported by kiln".into() }),
            // A node with a dangling input was reported already; its check would only repeat it.
            Some(_) if issues.len() > issues_before => {}
            Some(def) => {
                if let Err(reason) = def.check(&node) {
                    issues.push(NodeIssue { node: name, op, reason });
                }
            }
        }
        g.nodes.push(node);
    }
    for vo in &gp.output {
        match ids.get(&vo.name) {
            Some(&id) => g.outputs.push(id),
            None => issues.push(NodeIssue {
                node: vo.name.clone(),
                op: "output".into(),
                reason: "graph output is never produced".into(),
            }),
        }
    }
    if !issues.is_empty() {
        return Err(GraphError::Unsupported(issues));
    }
    g.toposort()?;
    crate::infer::infer_shapes(&mut g)?;
    Ok(g)
}

/// Names dynamic input dimensions. Equal dim_params are one symbol and
/// different ones stay different (folding relies on equal symbols meaning equal
/// sizes). The first batch-like dim_param (`batch`, `N`…), or else the first
/// non-sequence dim_param on an axis 0, becomes `batch`, as do unnamed axis-0
/// dims (kiln batches every input along axis 0); the first sequence-like
/// dim_param (`sequence`, `seq_len`…) becomes `seq`; others keep their names
/// and unnamed dims get fresh ones.
#[derive(Default)]
struct DimNames {
    map: HashMap<String, String>,
    batch: bool,
    seq: bool,
    fresh: usize,
}

impl DimNames {
    fn name(&mut self, param: Option<&str>, axis: usize) -> String {
        let Some(p) = param.filter(|p| !p.is_empty()) else {
            if axis == 0 {
                self.batch = true;
                return BATCH.to_string();
            }
            self.fresh += 1;
            return format!("d{}", self.fresh);
        };
        if let Some(n) = self.map.get(p) {
            return n.clone();
        }
        let batch_like = ["batch", "batch_size", "n", "bs"].contains(&p.to_ascii_lowercase().as_str());
        let n = if !self.batch && (batch_like || (axis == 0 && !is_sequence_name(p))) {
            self.batch = true;
            BATCH.to_string()
        } else if is_sequence_name(p) && !self.seq {
            self.seq = true;
            SEQ.to_string()
        } else if p == BATCH || p == SEQ {
            // A dim_param spelled like a kiln symbol but distinct from it.
            format!("{p}_")
        } else {
            p.to_string()
        };
        self.map.insert(p.to_string(), n.clone());
        n
    }
}

fn is_sequence_name(p: &str) -> bool {
    let p = p.to_ascii_lowercase();
    ["seq", "sequence", "seq_len", "sequence_length", "seqlen", "sentence_length", "tokens", "num_tokens"]
        .contains(&p.as_str())
}

fn value_type(tp: Option<&kiln_onnx::TypeProto>, names: &mut DimNames) -> Result<ValueType, String> {
    let Some(type_proto::Value::TensorType(tt)) = tp.and_then(|t| t.value.as_ref()) else {
        return Err("not a tensor".into());
    };
    let dtype = dtype_of(tt.elem_type)?;
    let shape = tt.shape.as_ref().map(|s| {
        s.dim
            .iter()
            .enumerate()
            .map(|(axis, d)| match &d.value {
                Some(dimension::Value::DimValue(v)) if *v >= 0 => Dim::fixed(*v),
                Some(dimension::Value::DimParam(p)) => Dim::sym(names.name(Some(p), axis)),
                _ => Dim::sym(names.name(None, axis)),
            })
            .collect()
    });
    Ok(ValueType { dtype, shape })
}

fn dtype_of(elem: i32) -> Result<DType, String> {
    Ok(match DataType::try_from(elem) {
        Ok(DataType::Float) => DType::F32,
        Ok(DataType::Float16) => DType::F16,
        Ok(DataType::Double) => DType::F64,
        Ok(DataType::Int64) => DType::I64,
        Ok(DataType::Int32) => DType::I32,
        Ok(DataType::Int16) => DType::I16,
        Ok(DataType::Int8) => DType::I8,
        Ok(DataType::Uint8) => DType::U8,
        Ok(DataType::Bool) => DType::Bool,
        other => return Err(format!("element type {other:?} is not supported")),
    })
}

/// TensorProto → Tensor. FP16 and FP64 initializers are widened to FP32: the
/// reference computes in FP32 and precision is chosen later by the FP16 pass.
pub fn tensor_from_proto(tp: &TensorProto, base_dir: Option<&Path>) -> Result<Tensor, GraphError> {
    let err = |r: String| GraphError::Onnx(format!("tensor {}: {r}", tp.name));
    let dims: Vec<usize> = tp
        .dims
        .iter()
        .map(|&d| usize::try_from(d).map_err(|_| err(format!("negative dim {d}"))))
        .collect::<Result<_, _>>()?;
    let n = dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).ok_or_else(|| err("too many elements".into()))?;
    let external;
    let raw: &[u8] = if tp.data_location == kiln_onnx::proto::tensor_proto::DataLocation::External as i32 {
        external = read_external(tp, base_dir).map_err(err)?;
        &external
    } else {
        &tp.raw_data
    };
    let dtype = dtype_of(tp.data_type).map_err(err)?;
    let width = dtype.size_of().unwrap_or(1);
    if !raw.is_empty() && Some(raw.len()) != n.checked_mul(width) {
        return Err(err(format!("{} data bytes for {n} elements of {dtype}", raw.len())));
    }
    let typed_len = |len: usize| if len == n { Ok(()) } else { Err(err(format!("{len} values for {n} elements"))) };
    let data = if !raw.is_empty() {
        match dtype {
            DType::F32 => TensorData::F32(chunks::<4>(raw).map(f32::from_le_bytes).collect()),
            DType::F16 => TensorData::F32(chunks::<2>(raw).map(|b| f16::from_le_bytes(b).to_f32()).collect()),
            DType::F64 => TensorData::F32(chunks::<8>(raw).map(|b| f64::from_le_bytes(b) as f32).collect()),
            DType::I64 => TensorData::I64(chunks::<8>(raw).map(i64::from_le_bytes).collect()),
            DType::I32 => TensorData::I32(chunks::<4>(raw).map(i32::from_le_bytes).collect()),
            DType::I16 => TensorData::I16(chunks::<2>(raw).map(i16::from_le_bytes).collect()),
            DType::I8 => TensorData::I8(raw.iter().map(|&b| b as i8).collect()),
            DType::U8 => TensorData::U8(raw.to_vec()),
            DType::Bool => TensorData::Bool(raw.iter().map(|&b| b != 0).collect()),
            DType::Bytes => return Err(err("string tensors are not supported".into())),
        }
    } else {
        match dtype {
            DType::F32 => {
                typed_len(tp.float_data.len())?;
                TensorData::F32(tp.float_data.clone())
            }
            DType::F64 => {
                typed_len(tp.double_data.len())?;
                TensorData::F32(tp.double_data.iter().map(|&x| x as f32).collect())
            }
            DType::I64 => {
                typed_len(tp.int64_data.len())?;
                TensorData::I64(tp.int64_data.clone())
            }
            DType::F16 | DType::I32 | DType::I16 | DType::I8 | DType::U8 | DType::Bool => {
                typed_len(tp.int32_data.len())?;
                let v = &tp.int32_data;
                match dtype {
                    DType::F16 => TensorData::F32(v.iter().map(|&x| f16::from_bits(x as u16).to_f32()).collect()),
                    DType::I32 => TensorData::I32(v.clone()),
                    DType::I16 => TensorData::I16(v.iter().map(|&x| x as i16).collect()),
                    DType::I8 => TensorData::I8(v.iter().map(|&x| x as i8).collect()),
                    DType::U8 => TensorData::U8(v.iter().map(|&x| x as u8).collect()),
                    _ => TensorData::Bool(v.iter().map(|&x| x != 0).collect()),
                }
            }
            DType::Bytes => return Err(err("string tensors are not supported".into())),
        }
    };
    Tensor::new(dims, data).map_err(|e| err(e.to_string()))
}

fn chunks<const N: usize>(raw: &[u8]) -> impl Iterator<Item = [u8; N]> + '_ {
    raw.chunks_exact(N).map(|c| <[u8; N]>::try_from(c).unwrap_or([0; N]))
}

/// Reads an external-data tensor: `location` must stay inside `base_dir`, and
/// `offset`/`length` must lie inside the file.
fn read_external(tp: &TensorProto, base_dir: Option<&Path>) -> Result<Vec<u8>, String> {
    let base = base_dir.ok_or("keeps its data in an external file, and no model directory is known")?;
    let entry = |k: &str| tp.external_data.iter().find(|e| e.key == k).map(|e| e.value.clone());
    let location = entry("location").ok_or("external data without a location")?;
    let rel = PathBuf::from(&location);
    if rel.is_absolute() || rel.components().any(|c| matches!(c, std::path::Component::ParentDir)) {
        return Err(format!("external data location {location:?} leaves the model directory"));
    }
    let parse = |k: &str| -> Result<Option<u64>, String> {
        entry(k).map(|v| v.parse::<u64>().map_err(|_| format!("bad external data {k} {v:?}"))).transpose()
    };
    let offset = parse("offset")?.unwrap_or(0);
    let bytes = std::fs::read(base.join(&rel)).map_err(|e| format!("external data {location}: {e}"))?;
    let len = parse("length")?.unwrap_or((bytes.len() as u64).saturating_sub(offset));
    let end = offset.checked_add(len).filter(|&e| e <= bytes.len() as u64).ok_or_else(|| {
        format!("external data {location}: offset {offset} + length {len} is past its {} bytes", bytes.len())
    })?;
    Ok(bytes[offset as usize..end as usize].to_vec())
}

fn attrs_from_proto(protos: &[AttributeProto], base_dir: Option<&Path>) -> Result<Attrs, String> {
    let mut attrs = Attrs::new();
    for a in protos {
        let value = match AttributeType::try_from(a.r#type) {
            Ok(AttributeType::Int) => Attr::Int(a.i.unwrap_or(0)),
            Ok(AttributeType::Ints) => Attr::Ints(a.ints.clone()),
            Ok(AttributeType::Float) => Attr::Float(a.f.unwrap_or(0.0)),
            Ok(AttributeType::Floats) => Attr::Floats(a.floats.clone()),
            Ok(AttributeType::String) => {
                Attr::String(String::from_utf8_lossy(a.s.as_deref().unwrap_or_default()).into_owned())
            }
            Ok(AttributeType::Strings) => {
                Attr::Strings(a.strings.iter().map(|s| String::from_utf8_lossy(s).into_owned()).collect())
            }
            Ok(AttributeType::Tensor) => {
                let t = a.t.as_ref().ok_or_else(|| format!("attribute {} has no tensor", a.name))?;
                Attr::Tensor(tensor_from_proto(t, base_dir).map_err(|e| e.to_string())?)
            }
            other => return Err(format!("attribute {} of type {other:?} is not supported", a.name)),
        };
        attrs.insert(a.name.clone(), value);
    }
    Ok(attrs)
}

/// The tensor a `Constant` node produces, from whichever value attribute it has.
fn constant_value(attrs: &Attrs) -> Result<Tensor, String> {
    let scalar = |data: TensorData| Tensor::new(vec![], data).map_err(|e| e.to_string());
    let vector = |n: usize, data: TensorData| Tensor::new(vec![n], data).map_err(|e| e.to_string());
    match attrs.iter().next() {
        Some((_, Attr::Tensor(t))) => Ok(t.clone()),
        Some((k, Attr::Float(f))) if k == "value_float" => scalar(TensorData::F32(vec![*f])),
        Some((k, Attr::Int(i))) if k == "value_int" => scalar(TensorData::I64(vec![*i])),
        Some((k, Attr::Floats(f))) if k == "value_floats" => vector(f.len(), TensorData::F32(f.clone())),
        Some((k, Attr::Ints(i))) if k == "value_ints" => vector(i.len(), TensorData::I64(i.clone())),
        other => Err(format!("Constant with {other:?} is not supported")),
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use kiln_onnx::proto::StringStringEntryProto;
    use kiln_onnx::proto::tensor_proto::DataLocation;
    use kiln_onnx::{GraphBuilder, attr_floats, tensor_f32};

    use super::*;
    use crate::reference::{RunOptions, run};

    fn temp_dir(tag: &str) -> Result<PathBuf, String> {
        let dir = std::env::temp_dir().join(format!("kiln-import-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        Ok(dir)
    }

    /// `y = x + w` where `w` (4 floats) lives in an external file.
    fn external_model(location: &str, offset: usize, length: Option<usize>) -> Result<ModelProto, String> {
        let e = |e: kiln_onnx::OnnxError| e.to_string();
        let mut b = GraphBuilder::new("ext");
        b.add_input("x", DataType::Float, &[kiln_onnx::Dim::Fixed(4)]).map_err(e)?;
        let mut w = tensor_f32("w", &[4], &[0.0; 4]).map_err(e)?;
        w.raw_data.clear();
        w.data_location = DataLocation::External as i32;
        let entry = |k: &str, v: String| StringStringEntryProto { key: k.into(), value: v };
        w.external_data = vec![entry("location", location.into()), entry("offset", offset.to_string())];
        if let Some(l) = length {
            w.external_data.push(entry("length", l.to_string()));
        }
        b.add_initializer(w).map_err(e)?;
        let y = b.add_node("Add", &["x", "w"], vec![]).map_err(e)?;
        b.add_output(&y, DataType::Float, &[kiln_onnx::Dim::Fixed(4)]).map_err(e)?;
        Ok(b.finish(17))
    }

    #[test]
    fn external_data_is_read_inside_the_model_directory_only() -> Result<(), String> {
        let dir = temp_dir("ext")?;
        let mut bytes = vec![0u8; 8]; // an offset before the data
        bytes.extend([1.0f32, 2.0, 3.0, 4.0].iter().flat_map(|v| v.to_le_bytes()));
        std::fs::write(dir.join("w.bin"), &bytes).map_err(|e| e.to_string())?;
        let g = import_model(&external_model("w.bin", 8, Some(16))?, Some(&dir)).map_err(|e| e.to_string())?;
        let x = Tensor::new(vec![4], TensorData::F32(vec![10.0; 4])).map_err(|e| e.to_string())?;
        let y = run(&g, &[x], RunOptions::default()).map_err(|e| e.to_string())?;
        assert_eq!(y[0].as_f32(), Some(&[11.0, 12.0, 13.0, 14.0][..]));

        let refuse = |m: ModelProto, base: Option<&Path>, want: &str| -> Result<(), String> {
            match import_model(&m, base) {
                Ok(_) => Err(format!("accepted a model that should fail with {want:?}")),
                Err(e) if e.to_string().contains(want) => Ok(()),
                Err(e) => Err(format!("wrong error: {e}")),
            }
        };
        refuse(external_model("../w.bin", 0, None)?, Some(&dir), "leaves the model directory")?;
        refuse(external_model("/etc/passwd", 0, None)?, Some(&dir), "leaves the model directory")?;
        refuse(external_model("w.bin", 16, Some(16))?, Some(&dir), "past its 24 bytes")?;
        refuse(external_model("w.bin", 0, Some(12))?, Some(&dir), "12 data bytes for 4 elements")?;
        refuse(external_model("missing.bin", 0, None)?, Some(&dir), "missing.bin")?;
        refuse(external_model("w.bin", 8, None)?, None, "no model directory")?;
        std::fs::remove_dir_all(&dir).map_err(|e| e.to_string())
    }

    #[test]
    fn opsets_constants_and_dim_names() -> Result<(), String> {
        let e = |e: kiln_onnx::OnnxError| e.to_string();
        let mut b = GraphBuilder::new("g");
        let dims = [
            kiln_onnx::Dim::Symbolic("N".into()),
            kiln_onnx::Dim::Symbolic("sequence_length".into()),
            kiln_onnx::Dim::Symbolic("heads".into()),
        ];
        b.add_input("x", DataType::Float, &dims).map_err(e)?;
        let c = b.add_node("Constant", &[], vec![attr_floats("value_floats", &[1.0, 2.0])]).map_err(e)?;
        let y = b.add_node("Mul", &["x", &c], vec![]).map_err(e)?;
        b.add_output(&y, DataType::Float, &[]).map_err(e)?;
        let model = b.finish(17);
        let g = import_model(&model, None).map_err(|e| e.to_string())?;
        assert_eq!(g.shape(g.inputs[0]), Some(&vec![Dim::sym("batch"), Dim::sym("seq"), Dim::sym("heads")]));
        // Different dim_params stay different symbols, even on axis 0.
        let mut names = DimNames::default();
        let got: Vec<String> = [(Some("N"), 0), (Some("M"), 0), (Some("N"), 1), (None, 0), (None, 2), (Some("seq"), 1)]
            .iter()
            .map(|&(p, a)| names.name(p, a))
            .collect();
        assert_eq!(got, ["batch", "M", "batch", "batch", "d1", "seq"]);
        // Sequence-first layouts keep their names' meaning.
        let mut names = DimNames::default();
        assert_eq!([names.name(Some("sequence"), 0), names.name(Some("batch_size"), 1)], ["seq", "batch"]);
        assert!(g.nodes.iter().all(|n| n.op != "Constant"), "Constant nodes become constant values");
        assert_eq!(g.shape(g.outputs[0]).map(Vec::len), Some(3));

        let mut old = model.clone();
        old.opset_import[0].version = 11;
        let err = import_model(&old, None).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("opset 11 is not supported"), "{err}");
        let mut none = model;
        none.opset_import.clear();
        assert!(import_model(&none, None).is_err());
        Ok(())
    }

    #[test]
    fn dangling_inputs_and_outputs_are_reported_with_unsupported_ops() -> Result<(), String> {
        let e = |e: kiln_onnx::OnnxError| e.to_string();
        let mut b = GraphBuilder::new("g");
        b.add_input("x", DataType::Float, &[kiln_onnx::Dim::Fixed(2)]).map_err(e)?;
        let y = b.add_node("Relu", &["x"], vec![]).map_err(e)?;
        b.add_output(&y, DataType::Float, &[]).map_err(e)?;
        let mut model = b.finish(17);
        let graph = model.graph.as_mut().ok_or("no graph")?;
        graph.node[0].input[0] = "nowhere".into();
        graph.node.push(kiln_onnx::NodeProto { op_type: "Loop".into(), name: "loop".into(), ..Default::default() });
        let err = import_model(&model, None).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("2 unsupported") && err.contains("nowhere") && err.contains("loop (Loop)"), "{err}");
        Ok(())
    }
}
