//! Explicit quantisation: a fused convolution or dense layer whose input arrives through
//! a QuantizeLinear → DequantizeLinear pair (symmetric INT8, one scale) becomes an INT8
//! node with that scale, reading the unquantised input directly: the INT8 node quantises
//! it exactly as the pair did. Its weights, already dequantised by constant folding, get
//! per-output-channel scales `max |w| / 127` — the model's own scales whenever each
//! channel's largest quantised weight is ±127, as symmetric max calibration (TensorRT's
//! toolkits, ONNX Runtime's per-channel quantiser) produces. Other Q/DQ pairs stay and run
//! as fake quantisation.

use super::{Pass, PassContext, PassStats};
use crate::graph::{Attr, Graph, GraphError};
use crate::quant::{INPUT_SCALE, WEIGHT_SCALES, candidates, int8};
use crate::{DType, TensorData};

#[derive(Debug, Clone, Copy, Default)]
pub struct QdqFolding;

/// The scale of a symmetric INT8 Q or DQ node: a constant scalar scale and an INT8
/// zero point of 0.
fn symmetric_scale(graph: &Graph, node: usize) -> Option<f32> {
    let n = &graph.nodes[node];
    let scale = graph.constant(n.input(1)?)?;
    let zero = graph.constant(n.input(2)?)?;
    let s = match scale.as_f32()? {
        [s] if s.is_finite() && *s > 0.0 => *s,
        _ => return None,
    };
    match zero.data() {
        TensorData::I8(z) if z.len() == 1 && z[0] == 0 => Some(s),
        _ => None,
    }
}

impl Pass for QdqFolding {
    fn name(&self) -> &'static str {
        "qdq"
    }

    fn run(&self, graph: &mut Graph, _cx: &PassContext) -> Result<PassStats, GraphError> {
        let producers = graph.producers();
        let mut folded = 0;
        for i in candidates(graph) {
            let Some(x) = graph.nodes[i].input(0) else { continue };
            let Some(&dq) = producers.get(&x) else { continue };
            if graph.nodes[dq].op != "DequantizeLinear" {
                continue;
            }
            let Some(&q) = graph.nodes[dq].input(0).and_then(|v| producers.get(&v)) else { continue };
            if graph.nodes[q].op != "QuantizeLinear" {
                continue;
            }
            let (Some(sq), Some(sdq)) = (symmetric_scale(graph, q), symmetric_scale(graph, dq)) else { continue };
            let Some(source) = graph.nodes[q].input(0) else { continue };
            if sq != sdq || graph.values[source].ty.as_ref().is_none_or(|t| t.dtype != DType::F32) {
                continue;
            }
            let node = &graph.nodes[i];
            let Some(weights) = node.input(1).and_then(|w| graph.constant(w)) else { continue };
            let weight_scales = int8::weight_scales(node, weights)
                .map_err(|reason| GraphError::Invalid(format!("{}: {reason}", node.name)))?;
            let node = &mut graph.nodes[i];
            node.inputs[0] = Some(source);
            node.attrs.insert(INPUT_SCALE, Attr::Float(sq));
            node.attrs.insert(WEIGHT_SCALES, Attr::Floats(weight_scales));
            folded += 1;
        }
        let mut stats = PassStats { rewrites: folded, notes: Vec::new() };
        if folded > 0 {
            stats.notes.push(format!("Q/DQ → INT8 layer ×{folded}"));
        }
        Ok(stats)
    }
}
