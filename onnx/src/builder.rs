//! A small graph builder: typed inputs and outputs, raw-data initializers, nodes with
//! generated unique output names, and [`GraphBuilder::finish`] into a [`ModelProto`].

use std::collections::HashSet;

use crate::error::OnnxError;
use crate::proto::attribute_proto::AttributeType;
use crate::proto::tensor_proto::DataType;
use crate::proto::tensor_shape_proto::{Dimension, dimension};
use crate::proto::{
    AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, TensorProto, TensorShapeProto, TypeProto,
    ValueInfoProto, type_proto,
};

/// The IR version [`GraphBuilder::finish`] writes. ONNX Runtime has read IR 10 since 1.18
/// and the onnx checker accepts it with any opset from 1 to 21.
pub const IR_VERSION: i64 = 10;

/// The opset kiln's exporter targets unless told otherwise: the first with LayerNormalization.
pub const DEFAULT_OPSET: i64 = 17;

/// One dimension of a graph input or output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dim {
    Fixed(i64),
    /// A named size decided at run time (`batch`, `sequence`); equal names mean equal sizes.
    Symbolic(String),
}

/// Builds one [`GraphProto`]. Every value name (input, initializer, node output) is
/// unique; node inputs must name a value defined earlier, so the node list stays
/// topologically sorted by construction.
#[derive(Debug)]
pub struct GraphBuilder {
    graph: GraphProto,
    values: HashSet<String>,
    node_names: HashSet<String>,
}

impl GraphBuilder {
    /// An empty graph called `name`.
    pub fn new(name: impl Into<String>) -> Self {
        GraphBuilder {
            graph: GraphProto { name: name.into(), ..GraphProto::default() },
            values: HashSet::new(),
            node_names: HashSet::new(),
        }
    }

    /// Whether `name` is already a value of the graph.
    pub fn contains(&self, name: &str) -> bool {
        self.values.contains(name)
    }

    /// `hint` if no value has that name yet, otherwise `hint_1`, `hint_2`, … (the first free one).
    /// The name is not reserved until something defines it.
    pub fn unique_name(&self, hint: &str) -> String {
        if !self.values.contains(hint) {
            return hint.to_string();
        }
        (1usize..)
            .map(|k| format!("{hint}_{k}"))
            .find(|candidate| !self.values.contains(candidate))
            .unwrap_or_else(|| hint.to_string())
    }

    /// Declares a graph input.
    pub fn add_input(&mut self, name: &str, elem: DataType, dims: &[Dim]) -> Result<(), OnnxError> {
        self.define(name)?;
        self.graph.input.push(value_info(name, elem, dims)?);
        Ok(())
    }

    /// Declares `name` (which must already be defined) as a graph output.
    pub fn add_output(&mut self, name: &str, elem: DataType, dims: &[Dim]) -> Result<(), OnnxError> {
        if !self.values.contains(name) {
            return Err(OnnxError::UnknownValue(name.to_string()));
        }
        self.graph.output.push(value_info(name, elem, dims)?);
        Ok(())
    }

    /// Adds an FP32 initializer (stored as little-endian `raw_data`) and returns its name.
    pub fn add_initializer_f32(&mut self, name: &str, dims: &[i64], data: &[f32]) -> Result<String, OnnxError> {
        let tensor = tensor_f32(name, dims, data)?;
        self.add_initializer(tensor)
    }

    /// Adds an INT64 initializer (stored as little-endian `raw_data`) and returns its name.
    pub fn add_initializer_i64(&mut self, name: &str, dims: &[i64], data: &[i64]) -> Result<String, OnnxError> {
        let tensor = tensor_i64(name, dims, data)?;
        self.add_initializer(tensor)
    }

    /// Adds a ready-made tensor as an initializer under its own name.
    pub fn add_initializer(&mut self, tensor: TensorProto) -> Result<String, OnnxError> {
        self.define(&tensor.name)?;
        let name = tensor.name.clone();
        self.graph.initializer.push(tensor);
        Ok(name)
    }

    /// Adds a single-output node and returns its (generated, unique) output name.
    pub fn add_node(
        &mut self,
        op_type: &str,
        inputs: &[&str],
        attributes: Vec<AttributeProto>,
    ) -> Result<String, OnnxError> {
        let mut outputs = self.add_node_n(op_type, inputs, 1, attributes)?;
        outputs.pop().ok_or_else(|| OnnxError::Invalid(format!("{op_type} produced no output")))
    }

    /// Adds a node with `n_outputs` generated output names and returns them.
    pub fn add_node_n(
        &mut self,
        op_type: &str,
        inputs: &[&str],
        n_outputs: usize,
        attributes: Vec<AttributeProto>,
    ) -> Result<Vec<String>, OnnxError> {
        let node_name = self.unique_node_name(op_type);
        let outputs: Vec<String> = (0..n_outputs)
            .map(|j| {
                let hint = if n_outputs == 1 { format!("{node_name}_out") } else { format!("{node_name}_out{j}") };
                self.unique_name(&hint)
            })
            .collect();
        let refs: Vec<&str> = outputs.iter().map(String::as_str).collect();
        self.push_node(node_name, op_type, inputs, &refs, attributes)?;
        Ok(outputs)
    }

    /// Adds a node whose outputs get exactly the given names (e.g. a graph output's name).
    pub fn add_node_with_outputs(
        &mut self,
        op_type: &str,
        inputs: &[&str],
        outputs: &[&str],
        attributes: Vec<AttributeProto>,
    ) -> Result<(), OnnxError> {
        let node_name = self.unique_node_name(op_type);
        self.push_node(node_name, op_type, inputs, outputs, attributes)
    }

    /// Wraps the graph in a model importing the default domain at `opset`.
    pub fn finish(self, opset: i64) -> ModelProto {
        ModelProto {
            ir_version: IR_VERSION,
            opset_import: vec![OperatorSetIdProto { domain: String::new(), version: opset }],
            producer_name: "kiln".to_string(),
            producer_version: env!("CARGO_PKG_VERSION").to_string(),
            graph: Some(self.graph),
            ..ModelProto::default()
        }
    }

    fn push_node(
        &mut self,
        node_name: String,
        op_type: &str,
        inputs: &[&str],
        outputs: &[&str],
        attribute: Vec<AttributeProto>,
    ) -> Result<(), OnnxError> {
        // An empty input name is ONNX's "optional input omitted".
        if let Some(missing) = inputs.iter().find(|i| !i.is_empty() && !self.values.contains(**i)) {
            return Err(OnnxError::UnknownValue((*missing).to_string()));
        }
        for (k, out) in outputs.iter().enumerate() {
            if self.values.contains(*out) || outputs[..k].contains(out) {
                return Err(OnnxError::DuplicateName((*out).to_string()));
            }
        }
        for out in outputs {
            self.values.insert((*out).to_string());
        }
        self.node_names.insert(node_name.clone());
        self.graph.node.push(NodeProto {
            input: inputs.iter().map(|s| (*s).to_string()).collect(),
            output: outputs.iter().map(|s| (*s).to_string()).collect(),
            name: node_name,
            op_type: op_type.to_string(),
            attribute,
            ..NodeProto::default()
        });
        Ok(())
    }

    fn unique_node_name(&self, op_type: &str) -> String {
        let base = self.graph.node.len();
        (base..)
            .map(|k| format!("{op_type}_{k}"))
            .find(|candidate| !self.node_names.contains(candidate))
            .unwrap_or_else(|| op_type.to_string())
    }

    fn define(&mut self, name: &str) -> Result<(), OnnxError> {
        if name.is_empty() {
            return Err(OnnxError::Invalid("empty value name".into()));
        }
        if !self.values.insert(name.to_string()) {
            return Err(OnnxError::DuplicateName(name.to_string()));
        }
        Ok(())
    }
}

/// A tensor-typed [`ValueInfoProto`].
pub fn value_info(name: &str, elem: DataType, dims: &[Dim]) -> Result<ValueInfoProto, OnnxError> {
    let dim = dims
        .iter()
        .map(|d| match d {
            Dim::Fixed(n) if *n < 0 => Err(OnnxError::Invalid(format!("{name}: negative dimension {n}"))),
            Dim::Fixed(n) => Ok(dimension::Value::DimValue(*n)),
            Dim::Symbolic(s) => Ok(dimension::Value::DimParam(s.clone())),
        })
        .map(|v| v.map(|value| Dimension { value: Some(value), denotation: String::new() }))
        .collect::<Result<Vec<_>, _>>()?;
    let tensor = type_proto::Tensor { elem_type: elem as i32, shape: Some(TensorShapeProto { dim }) };
    Ok(ValueInfoProto {
        name: name.to_string(),
        r#type: Some(TypeProto { value: Some(type_proto::Value::TensorType(tensor)), denotation: String::new() }),
        doc_string: String::new(),
    })
}

/// An FP32 tensor with `raw_data`; `dims` empty means a scalar.
pub fn tensor_f32(name: &str, dims: &[i64], data: &[f32]) -> Result<TensorProto, OnnxError> {
    check_len(name, dims, data.len())?;
    let raw_data = data.iter().flat_map(|v| v.to_le_bytes()).collect();
    Ok(TensorProto {
        name: name.to_string(),
        dims: dims.to_vec(),
        data_type: DataType::Float as i32,
        raw_data,
        ..TensorProto::default()
    })
}

/// An INT8 tensor with `raw_data` (quantised weights, zero points); `dims` empty means a scalar.
pub fn tensor_i8(name: &str, dims: &[i64], data: &[i8]) -> Result<TensorProto, OnnxError> {
    check_len(name, dims, data.len())?;
    Ok(TensorProto {
        name: name.to_string(),
        dims: dims.to_vec(),
        data_type: DataType::Int8 as i32,
        raw_data: data.iter().map(|&v| v as u8).collect(),
        ..TensorProto::default()
    })
}

/// An INT64 tensor with `raw_data`; `dims` empty means a scalar.
pub fn tensor_i64(name: &str, dims: &[i64], data: &[i64]) -> Result<TensorProto, OnnxError> {
    check_len(name, dims, data.len())?;
    let raw_data = data.iter().flat_map(|v| v.to_le_bytes()).collect();
    Ok(TensorProto {
        name: name.to_string(),
        dims: dims.to_vec(),
        data_type: DataType::Int64 as i32,
        raw_data,
        ..TensorProto::default()
    })
}

fn check_len(name: &str, dims: &[i64], len: usize) -> Result<(), OnnxError> {
    let wrong = || OnnxError::DataLength { name: name.to_string(), dims: dims.to_vec(), len };
    let mut expected: usize = 1;
    for &d in dims {
        let d = usize::try_from(d).map_err(|_| wrong())?;
        expected = expected.checked_mul(d).ok_or_else(wrong)?;
    }
    if expected == len { Ok(()) } else { Err(wrong()) }
}

/// An `INT` attribute.
pub fn attr_int(name: &str, value: i64) -> AttributeProto {
    AttributeProto { name: name.to_string(), r#type: AttributeType::Int as i32, i: Some(value), ..Default::default() }
}

/// An `INTS` attribute.
pub fn attr_ints(name: &str, values: &[i64]) -> AttributeProto {
    AttributeProto {
        name: name.to_string(),
        r#type: AttributeType::Ints as i32,
        ints: values.to_vec(),
        ..Default::default()
    }
}

/// A `FLOAT` attribute.
pub fn attr_float(name: &str, value: f32) -> AttributeProto {
    AttributeProto { name: name.to_string(), r#type: AttributeType::Float as i32, f: Some(value), ..Default::default() }
}

/// A `FLOATS` attribute.
pub fn attr_floats(name: &str, values: &[f32]) -> AttributeProto {
    AttributeProto {
        name: name.to_string(),
        r#type: AttributeType::Floats as i32,
        floats: values.to_vec(),
        ..Default::default()
    }
}

/// A `STRING` attribute (UTF-8 bytes).
pub fn attr_string(name: &str, value: &str) -> AttributeProto {
    AttributeProto {
        name: name.to_string(),
        r#type: AttributeType::String as i32,
        s: Some(value.as_bytes().to_vec()),
        ..Default::default()
    }
}

/// A `TENSOR` attribute (e.g. `Constant`'s `value`).
pub fn attr_tensor(name: &str, value: TensorProto) -> AttributeProto {
    AttributeProto {
        name: name.to_string(),
        r#type: AttributeType::Tensor as i32,
        t: Some(value),
        ..Default::default()
    }
}
