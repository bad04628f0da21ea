//! INT8 post-training quantisation: which nodes can run in INT8, calibration of their
//! input activations over a calibration set ([`calib`]), the per-node quantisation
//! ([`Int8Plan`]) and its exact CPU emulation ([`int8`]), and the accuracy gate that keeps
//! the most sensitive layers in higher precision ([`gate`]).

pub mod calib;
pub mod export;
pub mod gate;
pub mod int8;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::graph::{Attr, Graph, GraphError, ValueId};
use crate::reference::{Hooks, RunOptions, run_with};
use crate::{DType, Tensor};
pub use calib::{Histogram, Method};
pub use int8::NodeQuant;

/// The nodes that have an INT8 form: fused convolutions and dense layers whose weights
/// are constants and whose input is a computed FP32 activation.
pub fn candidates(graph: &Graph) -> Vec<usize> {
    graph
        .nodes
        .iter()
        .enumerate()
        .filter(|(_, n)| matches!(n.op.as_str(), "kiln.FusedConv" | "kiln.Dense"))
        .filter(|(_, n)| {
            let (Some(x), Some(w)) = (n.input(0), n.input(1)) else { return false };
            let (xv, wv) = (&graph.values[x], &graph.values[w]);
            let float = |v: &crate::graph::Value| v.ty.as_ref().is_some_and(|t| t.dtype == DType::F32);
            // A residual must not widen the output (the INT8 epilogue adds it per element).
            let residual_fits =
                match (n.input(3).and_then(|z| graph.shape(z)), n.outputs.first().and_then(|&y| graph.shape(y))) {
                    (Some(z), Some(y)) => z.len() <= y.len(),
                    _ => true,
                };
            xv.constant.is_none()
                && float(xv)
                && residual_fits
                && wv.constant.as_deref().is_some_and(|t| t.dtype() == DType::F32 && int8::supported(n, t))
        })
        .map(|(i, _)| i)
        .collect()
}

/// Histograms of every candidate's input activation over a calibration set: what
/// `kiln build --calib` caches, so that another method needs no second pass.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CalibrationCache {
    /// Format of this file.
    pub version: u32,
    /// Graph name the histograms belong to.
    pub graph: String,
    /// SHA-256 over the calibrated layers' names and weights: graph names such as
    /// `main_graph` are shared by many models, weights are not.
    pub fingerprint: String,
    /// Calibration samples (batches × items) seen.
    pub samples: usize,
    /// Histogram per activation (value name).
    pub histograms: BTreeMap<String, Histogram>,
}

const CACHE_VERSION: u32 = 2;

/// What ties a calibration cache to one model (see [`CalibrationCache::fingerprint`]).
pub fn fingerprint(graph: &Graph) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for i in candidates(graph) {
        let n = &graph.nodes[i];
        h.update(n.name.as_bytes());
        if let Some(w) = n.input(1).and_then(|w| graph.constant(w)).and_then(Tensor::as_f32) {
            for v in w {
                h.update(v.to_le_bytes());
            }
        }
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

impl CalibrationCache {
    pub fn save(&self, path: &Path) -> Result<(), GraphError> {
        let json = serde_json::to_vec(self).map_err(|e| GraphError::Invalid(e.to_string()))?;
        std::fs::write(path, json).map_err(|e| GraphError::Invalid(format!("{}: {e}", path.display())))
    }

    /// Reads a cache written for `graph`; one for another graph or format is an error.
    pub fn load(path: &Path, graph: &Graph) -> Result<Self, GraphError> {
        let bad = |reason: String| GraphError::Invalid(format!("calibration cache {}: {reason}", path.display()));
        let bytes = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
        let cache: Self = serde_json::from_slice(&bytes).map_err(|e| bad(e.to_string()))?;
        if cache.version != CACHE_VERSION {
            return Err(bad(format!("format {} (this kiln reads {CACHE_VERSION})", cache.version)));
        }
        if cache.graph != graph.name || cache.fingerprint != fingerprint(graph) {
            return Err(bad(format!("written for another model (graph {:?}) or other weights", cache.graph)));
        }
        for (name, h) in &cache.histograms {
            if !(h.counts.is_empty() || h.counts.len() == calib::BINS) || !(h.width.is_finite() && h.width >= 0.0) {
                return Err(bad(format!("histogram of {name} is malformed")));
            }
        }
        Ok(cache)
    }

    /// Clipping thresholds by `method`, per activation name.
    pub fn thresholds(&self, method: Method) -> BTreeMap<String, f32> {
        self.histograms.iter().map(|(name, h)| (name.clone(), h.threshold(method))).collect()
    }
}

/// Collects the histograms: run it over every calibration batch, then take the cache.
#[derive(Debug)]
pub struct Calibrator {
    /// Calibrated values and their histograms.
    targets: HashMap<ValueId, Histogram>,
    cache: CalibrationCache,
}

impl Calibrator {
    pub fn new(graph: &Graph) -> Self {
        let targets = candidates(graph)
            .into_iter()
            .filter_map(|i| graph.nodes[i].input(0))
            .map(|v| (v, Histogram::default()))
            .collect();
        let cache = CalibrationCache {
            version: CACHE_VERSION,
            graph: graph.name.clone(),
            fingerprint: fingerprint(graph),
            ..Default::default()
        };
        Self { targets, cache }
    }

    /// Runs one batch through the FP32 graph, adding what every calibrated value held.
    pub fn observe(&mut self, graph: &Graph, inputs: &[Tensor]) -> Result<(), GraphError> {
        let targets = &mut self.targets;
        let mut observe = |v: ValueId, t: &Tensor| {
            if let (Some(h), Some(data)) = (targets.get_mut(&v), t.as_f32()) {
                h.add(data);
            }
        };
        let hooks = Hooks { int8: None, observe: Some(&mut observe) };
        run_with(graph, inputs, RunOptions::default(), hooks)?;
        self.cache.samples += inputs.first().map_or(0, Tensor::batch);
        Ok(())
    }

    pub fn finish(mut self, graph: &Graph) -> CalibrationCache {
        for (v, h) in self.targets {
            self.cache.histograms.insert(graph.values[v].name.clone(), h);
        }
        self.cache
    }
}

/// Node attribute: the INT8 input activation's scale.
pub const INPUT_SCALE: &str = "int8_input_scale";
/// Node attribute: the INT8 weights' per-output-channel scales.
pub const WEIGHT_SCALES: &str = "int8_weight_scales";

/// The INT8 nodes of a plan, by node name, with their scales.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Int8Plan {
    pub nodes: HashMap<String, NodeQuant>,
}

impl Int8Plan {
    /// Every candidate not in `keep` (node names left in higher precision), with input
    /// scales from `thresholds` (activation name → amax). A candidate whose input has no
    /// threshold, or whose reduction is too long to emulate exactly, stays out.
    pub fn new(graph: &Graph, thresholds: &BTreeMap<String, f32>, keep: &[String]) -> Result<Self, GraphError> {
        let mut nodes = HashMap::new();
        for i in candidates(graph) {
            let node = &graph.nodes[i];
            // Plans name their layers; two nodes of one name would share one quantisation.
            if graph.nodes.iter().filter(|n| n.name == node.name).count() > 1 {
                return Err(GraphError::Invalid(format!(
                    "two nodes are called {:?}: INT8 layers need unique names",
                    node.name
                )));
            }
            if keep.contains(&node.name) {
                continue;
            }
            let (Some(x), Some(w)) = (node.input(0), node.input(1)) else { continue };
            let Some(&amax) = thresholds.get(&graph.values[x].name) else { continue };
            let Some(weights) = graph.values[w].constant.as_deref() else { continue };
            let weight_scales = int8::weight_scales(node, weights)
                .map_err(|reason| GraphError::Invalid(format!("{}: {reason}", node.name)))?;
            nodes.insert(node.name.clone(), NodeQuant { input_scale: int8::scale_for(amax), weight_scales });
        }
        Ok(Self { nodes })
    }

    /// Records the plan in the graph: INT8 nodes carry `int8_input_scale` and
    /// `int8_weight_scales` (a plan file keeps them, the reference executor and the CUDA
    /// engine read them); every other node loses them.
    pub fn apply(&self, graph: &mut Graph) {
        for node in &mut graph.nodes {
            match self.nodes.get(&node.name) {
                Some(q) => {
                    node.attrs.insert(INPUT_SCALE, Attr::Float(q.input_scale));
                    node.attrs.insert(WEIGHT_SCALES, Attr::Floats(q.weight_scales.clone()));
                }
                None => {
                    node.attrs.remove(INPUT_SCALE);
                    node.attrs.remove(WEIGHT_SCALES);
                }
            }
        }
    }

    /// The plan a graph carries (see [`Int8Plan::apply`]).
    pub fn from_graph(graph: &Graph) -> Self {
        let nodes = graph
            .nodes
            .iter()
            .filter_map(|n| match (n.attrs.get(INPUT_SCALE), n.attrs.get(WEIGHT_SCALES)) {
                (Some(Attr::Float(s)), Some(Attr::Floats(w))) => {
                    Some((n.name.clone(), NodeQuant { input_scale: *s, weight_scales: w.clone() }))
                }
                _ => None,
            })
            .collect();
        Self { nodes }
    }

    /// The INT8 node names in graph order.
    pub fn names_in_order(&self, graph: &Graph) -> Vec<String> {
        graph.nodes.iter().filter(|n| self.nodes.contains_key(&n.name)).map(|n| n.name.clone()).collect()
    }

    /// Runs `graph` with these nodes in emulated INT8 (FP16 nodes rounded when `fp16`).
    pub fn run(&self, graph: &Graph, inputs: &[Tensor], fp16: bool) -> Result<Vec<Tensor>, GraphError> {
        let hooks = Hooks { int8: Some(self), observe: None };
        run_with(graph, inputs, RunOptions { emulate_fp16: fp16 }, hooks)
    }
}

#[cfg(test)]
mod tests;
