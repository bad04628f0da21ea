//! kiln's calibration as an explicitly quantised ONNX model, for other runtimes (ONNX
//! Runtime, TensorRT): every INT8 layer of a plan gets a QuantizeLinear → DequantizeLinear
//! pair on its input with the calibrated scale, and its weights become INT8 behind a
//! per-channel DequantizeLinear. Fused layers keep their ONNX node's name, which is how
//! plan layers are found in the original model. Per-channel symmetric scales commute with
//! the per-channel factor a folded BatchNorm applies, so quantising the original weights
//! gives the integers kiln quantises its folded weights to (but for rare ties that the
//! fold's rounding moves).

use kiln_onnx::proto::{ModelProto, NodeProto};
use kiln_onnx::{attr_int, tensor_f32, tensor_i8};
use serde::Serialize;

use super::Int8Plan;
use crate::graph::GraphError;

/// What the export did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct QdqExport {
    /// ONNX nodes given Q/DQ inputs.
    pub quantized: Vec<String>,
    /// INT8 layers left in float, with why.
    pub skipped: Vec<(String, String)>,
}

fn node(name: String, op: &str, inputs: &[&str], output: &str, axis: Option<i64>) -> NodeProto {
    NodeProto {
        name,
        op_type: op.into(),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: vec![output.into()],
        attribute: axis.map(|a| vec![attr_int("axis", a)]).unwrap_or_default(),
        ..NodeProto::default()
    }
}

/// The weights' output-channel axis for an ONNX node, when it has an INT8 form.
fn channel_axis(n: &NodeProto, rank: usize) -> Option<usize> {
    let trans_b = n.attribute.iter().find(|a| a.name == "transB").is_some_and(|a| a.i == Some(1));
    match (n.op_type.as_str(), rank) {
        ("Conv", 3..=5) => Some(0),
        ("Gemm", 2) => Some(if trans_b { 0 } else { 1 }),
        ("MatMul", 2) => Some(1),
        _ => None,
    }
}

/// Per-channel symmetric INT8 of `w` (shape `dims`) along `axis`: the integers and scales.
fn quantise_weights(w: &[f32], dims: &[usize], axis: usize) -> (Vec<i8>, Vec<f32>) {
    let channels = dims[axis];
    let inner: usize = dims[axis + 1..].iter().product::<usize>().max(1);
    let mut amax = vec![0f32; channels];
    for (i, &v) in w.iter().enumerate() {
        let k = (i / inner) % channels;
        amax[k] = amax[k].max(v.abs());
    }
    let scales: Vec<f32> = amax.into_iter().map(super::int8::scale_for).collect();
    let q = w
        .iter()
        .enumerate()
        .map(|(i, &v)| {
            let r = (v / scales[(i / inner) % channels]).round_ties_even();
            if r.is_nan() { 0 } else { r.clamp(-127.0, 127.0) as i8 }
        })
        .collect();
    (q, scales)
}

/// `original` with Q/DQ on the inputs and weights of `plan`'s INT8 layers.
pub fn qdq_model(original: &ModelProto, plan: &Int8Plan) -> Result<(ModelProto, QdqExport), GraphError> {
    // Per-channel DequantizeLinear (its `axis`) needs opset 13; raising the opset would change
    // other ops' semantics (Squeeze, Reduce*), so older models are refused.
    let opset =
        original.opset_import.iter().find(|o| o.domain.is_empty() || o.domain == "ai.onnx").map_or(0, |o| o.version);
    if opset < 13 {
        return Err(GraphError::Invalid(format!("Q/DQ export needs opset 13 or later; the model has opset {opset}")));
    }
    let mut model = original.clone();
    let graph = model.graph.as_mut().ok_or_else(|| GraphError::Invalid("the model has no graph".into()))?;
    let mut report = QdqExport::default();
    let mut nodes = Vec::with_capacity(graph.node.len());
    let mut replaced: Vec<String> = Vec::new();
    let old = std::mem::take(&mut graph.node);
    for (index, mut n) in old.into_iter().enumerate() {
        // The importer's name for an unnamed node.
        let name = if n.name.is_empty() { format!("{}_{index}", n.op_type) } else { n.name.clone() };
        let Some(q) = plan.nodes.get(&name) else {
            nodes.push(n);
            continue;
        };
        let skip = |why: &str| (name.clone(), why.to_string());
        let weight_name = n.input.get(1).cloned().unwrap_or_default();
        let Some(wi) = graph.initializer.iter().position(|t| t.name == weight_name) else {
            report.skipped.push(skip("weights are not an initializer"));
            nodes.push(n);
            continue;
        };
        let w = &graph.initializer[wi];
        let dims: Vec<usize> = w.dims.iter().map(|&d| usize::try_from(d).unwrap_or(0)).collect();
        let (Some(axis), Ok(values)) = (channel_axis(&n, dims.len()), w.to_f32()) else {
            report.skipped.push(skip("no per-channel INT8 form for this node or its weights"));
            nodes.push(n);
            continue;
        };
        let (ints, scales) = quantise_weights(&values, &dims, axis);
        // The node's position keeps names unique where sanitising would merge them.
        let base = format!("{}_{index}", name.replace(['/', ':'], "_"));
        let (x_scale, zero) = (format!("{base}_x_scale"), format!("{base}_zero"));
        let (wq, ws, wz) = (format!("{base}_w_int8"), format!("{base}_w_scale"), format!("{base}_w_zero"));
        let dims_i64: Vec<i64> = w.dims.clone();
        let inits = [
            tensor_f32(&x_scale, &[], &[q.input_scale]),
            tensor_i8(&zero, &[], &[0]),
            tensor_i8(&wq, &dims_i64, &ints),
            tensor_f32(&ws, &[scales.len() as i64], &scales),
            tensor_i8(&wz, &[scales.len() as i64], &vec![0; scales.len()]),
        ];
        for t in inits {
            graph.initializer.push(t.map_err(|e| GraphError::Invalid(e.to_string()))?);
        }
        let x = n.input.first().cloned().unwrap_or_default();
        let (xq, xdq, wdq) = (format!("{base}_x_q"), format!("{base}_x_dq"), format!("{base}_w_dq"));
        nodes.push(node(format!("{base}_QuantizeLinear"), "QuantizeLinear", &[&x, &x_scale, &zero], &xq, None));
        nodes.push(node(format!("{base}_DequantizeLinear"), "DequantizeLinear", &[&xq, &x_scale, &zero], &xdq, None));
        nodes.push(node(
            format!("{base}_w_DequantizeLinear"),
            "DequantizeLinear",
            &[&wq, &ws, &wz],
            &wdq,
            Some(axis as i64),
        ));
        n.input[0] = xdq;
        replaced.push(std::mem::replace(&mut n.input[1], wdq));
        report.quantized.push(name);
        nodes.push(n);
    }
    graph.node = nodes;
    let unmatched: Vec<String> = plan
        .nodes
        .keys()
        .filter(|k| !report.quantized.contains(k) && !report.skipped.iter().any(|s| &s.0 == *k))
        .cloned()
        .collect();
    report.skipped.extend(unmatched.into_iter().map(|name| (name, "no ONNX node of this name".into())));
    // The float weights replaced above, where no node reads them any more (also from the
    // inputs list older models keep).
    let used: std::collections::HashSet<String> = graph.node.iter().flat_map(|n| n.input.iter().cloned()).collect();
    let outputs: std::collections::HashSet<String> = graph.output.iter().map(|o| o.name.clone()).collect();
    let removed: std::collections::HashSet<String> =
        replaced.into_iter().filter(|w| !used.contains(w) && !outputs.contains(w)).collect();
    graph.initializer.retain(|t| !removed.contains(&t.name));
    graph.input.retain(|v| !removed.contains(&v.name));
    Ok((model, report))
}
