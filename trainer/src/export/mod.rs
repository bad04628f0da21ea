//! ONNX export without Python: [`OnnxTracer`] runs a model's forward pass (the same
//! [`crate::ops::Ops`] code that trains it) and records it as an ONNX graph, which
//! kiln-onnx serializes.

mod tracer;

use std::path::Path;

use kiln_onnx::{ModelProto, OnnxError};

use crate::error::TrainError;
use crate::models::Network;

pub use tracer::OnnxTracer;

/// The opsets the exporter accepts: 17 introduced LayerNormalization, and 21 is the
/// newest that IR version 10 (what kiln-onnx writes) covers.
pub const OPSETS: std::ops::RangeInclusive<i64> = 17..=21;

/// Traces `net` into an ONNX model: graph inputs from [`Network::inputs`] (dynamic dims
/// become symbolic), parameters as FP32 initializers, outputs named as [`Network::outputs`].
pub fn export<N: Network>(net: &N, opset: i64) -> Result<ModelProto, TrainError> {
    if !OPSETS.contains(&opset) {
        return Err(TrainError::Export(format!(
            "opset {opset} is not supported (use {} to {})",
            OPSETS.start(),
            OPSETS.end()
        )));
    }
    let mut tracer = OnnxTracer::new("kiln");
    let inputs = net.inputs().iter().map(|spec| tracer.add_input(spec)).collect::<Result<Vec<_>, _>>()?;
    let outputs = net.forward(&mut tracer, &inputs)?;
    let specs = net.outputs();
    if outputs.len() != specs.len() {
        return Err(TrainError::Export(format!(
            "forward returned {} values for {} declared outputs",
            outputs.len(),
            specs.len()
        )));
    }
    for (value, spec) in outputs.iter().zip(&specs) {
        tracer.add_output(value, spec)?;
    }
    Ok(tracer.finish(opset))
}

/// [`export`], then writes the model to `path`.
pub fn export_to_file<N: Network>(net: &N, path: impl AsRef<Path>, opset: i64) -> Result<(), TrainError> {
    let model = export(net, opset)?;
    kiln_onnx::save(&model, path.as_ref()).map_err(|e| match e {
        OnnxError::Io { path, source } => TrainError::Io { path, source },
        other => tracer::export_err(other),
    })
}
