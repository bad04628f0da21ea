//! `kiln build --verify`: runs the optimised graph on the reference executor
//! and the original ONNX file on ONNX Runtime with the same inputs, and
//! reports the error per output.

use std::collections::HashMap;
use std::path::Path;

use serde::Serialize;

use crate::graph::{Graph, GraphError, ValueId};
use crate::reference::{RunOptions, run};
use crate::{Backend, DType, OrtBackend, OrtOptions, OrtRuntime, Tensor, TensorData};

/// Error of one output, reference vs ONNX Runtime.
#[derive(Debug, Clone, Serialize)]
pub struct OutputError {
    pub name: String,
    pub shape: Vec<usize>,
    pub max_abs: f64,
    /// `max_abs` over the largest magnitude of the ONNX Runtime output, so that
    /// outputs near zero do not blow up the ratio.
    pub max_rel: f64,
    /// Cosine similarity of the flattened outputs (1 for identical directions).
    pub cosine: f64,
}

/// Deterministic inputs for `graph` at the given symbol values. Integer inputs
/// that index an embedding table get ids inside it; masks are all ones but the
/// last position of odd rows; token-type ids are zero.
pub fn sample_inputs(graph: &Graph, bindings: &HashMap<String, usize>, seed: u64) -> Result<Vec<Tensor>, GraphError> {
    let mut rng = Lcg(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    graph
        .inputs
        .iter()
        .map(|&id| {
            let v = graph.value(id);
            let err = |reason: String| GraphError::Input { name: v.name.clone(), reason };
            let ty = v.ty.as_ref().ok_or_else(|| err("no known type".into()))?;
            let shape = ty.shape.as_ref().ok_or_else(|| err("no known shape".into()))?;
            let dims =
                crate::graph::eval_shape(shape, bindings).ok_or_else(|| err("a dimension has no profile".into()))?;
            let n: usize = dims.iter().product();
            let lname = v.name.to_ascii_lowercase();
            let data = match ty.dtype {
                DType::F32 => TensorData::F32((0..n).map(|_| rng.normal()).collect()),
                DType::I64 | DType::I32 => {
                    let row = dims.last().copied().unwrap_or(1).max(1);
                    let vals: Vec<i64> = if lname.contains("mask") {
                        (0..n).map(|i| i64::from(!((i / row) % 2 == 1 && i % row == row - 1) || row == 1)).collect()
                    } else if lname.contains("type") || lname.contains("segment") {
                        vec![0; n]
                    } else {
                        let bound = embedding_rows(graph, id).unwrap_or(2).max(1) as u64;
                        (0..n).map(|_| (rng.next() % bound) as i64).collect()
                    };
                    if ty.dtype == DType::I64 {
                        TensorData::I64(vals)
                    } else {
                        TensorData::I32(vals.into_iter().map(|x| x as i32).collect())
                    }
                }
                DType::Bool => TensorData::Bool(vec![true; n]),
                other => return Err(err(format!("cannot generate {other} inputs"))),
            };
            Tensor::new(dims, data).map_err(|e| err(e.to_string()))
        })
        .collect()
}

/// Rows of the constant table a `Gather` reads with `id` as indices, if any.
fn embedding_rows(graph: &Graph, id: ValueId) -> Option<usize> {
    graph.nodes.iter().find_map(|n| {
        if n.op == "Gather" && n.input(1) == Some(id) {
            graph.constant(n.input(0)?).and_then(|t| t.shape().first().copied())
        } else {
            None
        }
    })
}

/// Per-output error of `ours` against `reference` (same order and shapes).
pub fn compare(names: &[String], ours: &[Tensor], reference: &[Tensor]) -> Result<Vec<OutputError>, GraphError> {
    names
        .iter()
        .zip(ours.iter().zip(reference))
        .map(|(name, (a, b))| {
            if a.shape() != b.shape() {
                return Err(GraphError::Invalid(format!(
                    "output {name}: shape {:?}, ONNX Runtime gives {:?}",
                    a.shape(),
                    b.shape()
                )));
            }
            let (x, y) = (as_f64(a), as_f64(b));
            let (mut max_abs, mut max_ref, mut dot, mut nx, mut ny) = (0f64, 0f64, 0f64, 0f64, 0f64);
            for (&p, &q) in x.iter().zip(&y) {
                // Equal values (equal infinities too) and NaN on both sides agree; NaN on
                // one side only is infinitely wrong (f64::max would silently drop a NaN).
                let diff = if p == q || (p.is_nan() && q.is_nan()) {
                    0.0
                } else if p.is_nan() || q.is_nan() {
                    f64::INFINITY
                } else {
                    (p - q).abs()
                };
                max_abs = max_abs.max(diff);
                // Scale and cosine over finite pairs, so one infinity cannot hide the rest.
                if p.is_finite() && q.is_finite() {
                    max_ref = max_ref.max(q.abs());
                    dot += p * q;
                    nx += p * p;
                    ny += q * q;
                }
            }
            let cosine =
                if nx == 0.0 && ny == 0.0 { 1.0 } else { dot / (nx.sqrt() * ny.sqrt()).max(f64::MIN_POSITIVE) };
            Ok(OutputError {
                name: name.clone(),
                shape: a.shape().to_vec(),
                max_abs,
                max_rel: max_abs / max_ref.max(f64::MIN_POSITIVE),
                cosine,
            })
        })
        .collect()
}

fn as_f64(t: &Tensor) -> Vec<f64> {
    match t.data() {
        TensorData::F32(v) => v.iter().map(|&x| f64::from(x)).collect(),
        TensorData::F16(v) => v.iter().map(|x| f64::from(x.to_f32())).collect(),
        TensorData::F64(v) => v.clone(),
        TensorData::I64(v) => v.iter().map(|&x| x as f64).collect(),
        TensorData::I32(v) => v.iter().map(|&x| f64::from(x)).collect(),
        TensorData::Bool(v) => v.iter().map(|&x| f64::from(u8::from(x))).collect(),
        _ => Vec::new(),
    }
}

/// Runs ONNX Runtime on `model` with inputs given in `graph.inputs` order.
pub fn run_ort(
    runtime: &OrtRuntime,
    model: &Path,
    graph: &Graph,
    inputs: &[Tensor],
) -> Result<Vec<Tensor>, GraphError> {
    let ort_err = |e: crate::EngineError| GraphError::Invalid(format!("ONNX Runtime: {e}"));
    let mut backend = OrtBackend::load(runtime, model, &OrtOptions::default()).map_err(ort_err)?;
    let by_name: HashMap<&str, &Tensor> =
        graph.inputs.iter().zip(inputs).map(|(&id, t)| (graph.value(id).name.as_str(), t)).collect();
    let feed = backend
        .metadata()
        .inputs
        .iter()
        .map(|spec| {
            by_name.get(spec.name.as_str()).map(|t| (*t).clone()).ok_or_else(|| GraphError::Input {
                name: spec.name.clone(),
                reason: "ONNX Runtime wants an input the graph does not have".into(),
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let outs = backend.run(&feed).map_err(ort_err)?;
    let names: Vec<String> = backend.metadata().outputs.iter().map(|s| s.name.clone()).collect();
    graph
        .outputs
        .iter()
        .map(|&o| {
            let name = &graph.value(o).name;
            names
                .iter()
                .position(|n| n == name)
                .map(|i| outs[i].clone())
                .ok_or_else(|| GraphError::Invalid(format!("ONNX Runtime has no output {name}")))
        })
        .collect()
}

/// Reference executor on `graph` vs ONNX Runtime on `model`, same inputs.
pub fn verify(
    runtime: &OrtRuntime,
    model: &Path,
    graph: &Graph,
    inputs: &[Tensor],
    opts: RunOptions,
) -> Result<Vec<OutputError>, GraphError> {
    let ours = run(graph, inputs, opts)?;
    let theirs = run_ort(runtime, model, graph, inputs)?;
    let names: Vec<String> = graph.outputs.iter().map(|&o| graph.value(o).name.clone()).collect();
    compare(&names, &ours, &theirs)
}

/// A small deterministic generator: inputs must be reproducible across runs.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        self.0 >> 33
    }

    fn uniform(&mut self) -> f32 {
        (self.next() as f32 + 0.5) / (1u64 << 31) as f32
    }

    /// Box–Muller.
    fn normal(&mut self) -> f32 {
        let (u, v) = (self.uniform(), self.uniform());
        (-2.0 * u.ln()).sqrt() * (std::f32::consts::TAU * v).cos()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compare_reports_errors_and_never_hides_nan() -> Result<(), GraphError> {
        let t = |v: Vec<f32>| {
            Tensor::new(vec![v.len()], TensorData::F32(v)).map_err(|e| GraphError::Invalid(e.to_string()))
        };
        let names = vec!["y".to_string()];
        let e = compare(&names, &[t(vec![1.0, 2.0])?], &[t(vec![1.0, 4.0])?])?;
        assert_eq!((e[0].max_abs, e[0].max_rel), (2.0, 0.5));
        let e = compare(&names, &[t(vec![f32::NAN, 2.0])?], &[t(vec![1.0, 2.0])?])?;
        assert!(e[0].max_rel.is_infinite());
        // An infinity in the reference must not scale the error away.
        let e = compare(&names, &[t(vec![1.0, 2.0, f32::NEG_INFINITY])?], &[t(vec![5.0, -7.0, f32::NEG_INFINITY])?])?;
        assert_eq!((e[0].max_abs, e[0].max_rel), (9.0, 9.0 / 7.0));
        let e = compare(&names, &[t(vec![1.0, f32::NAN])?], &[t(vec![1.0, f32::INFINITY])?])?;
        assert!(e[0].max_rel.is_infinite());
        assert!(compare(&names, &[t(vec![1.0])?], &[t(vec![1.0, 2.0])?]).is_err());
        Ok(())
    }
}
