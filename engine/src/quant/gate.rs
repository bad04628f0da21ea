//! The accuracy gate: FP32 against emulated INT8 on labelled data; when INT8 loses more
//! than the allowed drop, the layers whose lone quantisation disturbs the outputs most
//! are kept in higher precision (FP16 in an FP16 plan): the fewest of the most sensitive
//! that bring the drop within bounds, found by doubling and bisecting their count.

use std::collections::BTreeMap;

use serde::Serialize;

use super::Int8Plan;
use crate::Tensor;
use crate::graph::{Graph, GraphError};
use crate::reference::{RunOptions, run};

/// Labelled evaluation data: batches of model inputs with one class per item.
#[derive(Debug, Clone, Default)]
pub struct Labelled {
    pub batches: Vec<(Vec<Tensor>, Vec<usize>)>,
}

impl Labelled {
    pub fn len(&self) -> usize {
        self.batches.iter().map(|(_, l)| l.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[derive(Debug, Clone, Copy)]
pub struct GateOptions {
    /// Largest accepted loss of top-1 accuracy, in percentage points.
    pub max_drop: f64,
    /// Layers outside INT8 compute in FP16 (the plan's precision) rather than FP32.
    pub fp16: bool,
    /// Items used to measure each layer's sensitivity.
    pub sensitivity_samples: usize,
}

/// What the gate measured and decided, for the build report.
#[derive(Debug, Clone, Serialize)]
pub struct GateReport {
    pub samples: usize,
    /// Top-1 accuracy in percent.
    pub fp32_accuracy: f64,
    /// Every candidate layer in INT8 (the gate off).
    pub int8_accuracy_ungated: f64,
    /// The plan the gate chose.
    pub int8_accuracy: f64,
    /// Items whose INT8 top-1 equals the FP32 top-1, in percent (labels not needed).
    pub agreement: f64,
    pub max_drop: f64,
    pub int8_layers: usize,
    /// Layers kept out of INT8, most sensitive first.
    pub kept_fp16: Vec<String>,
    /// Relative output error with only that layer in INT8, largest first.
    pub sensitivity: Vec<(String, f64)>,
}

/// The top-1 class of every item of `output` (output 0, classes on the last axis).
fn predictions(output: &Tensor, items: usize) -> Result<Vec<usize>, GraphError> {
    let data = output.as_f32().ok_or_else(|| GraphError::Invalid("output 0 is not FP32".into()))?;
    let classes = output.shape().last().copied().unwrap_or(0);
    if classes == 0 || data.len() != classes * items {
        return Err(GraphError::Invalid(format!(
            "output {:?} does not hold one row of class scores per item ({items})",
            output.shape()
        )));
    }
    Ok(data.chunks(classes).map(argmax).collect())
}

/// Index of the largest score (the first on ties; NaN never wins).
pub fn argmax(row: &[f32]) -> usize {
    row.iter().enumerate().fold((0, f32::NEG_INFINITY), |b, (i, &v)| if v > b.1 { (i, v) } else { b }).0
}

fn first_output(mut outs: Vec<Tensor>) -> Result<Tensor, GraphError> {
    if outs.is_empty() {
        return Err(GraphError::Invalid("the graph has no output".into()));
    }
    Ok(outs.swap_remove(0))
}

/// Top-1 predictions over `data` with `plan`'s layers in INT8 (FP32 without a plan).
fn predict(graph: &Graph, data: &Labelled, plan: Option<&Int8Plan>, fp16: bool) -> Result<Vec<usize>, GraphError> {
    let mut out = Vec::with_capacity(data.len());
    for (inputs, labels) in &data.batches {
        let outs = match plan {
            Some(p) => p.run(graph, inputs, fp16)?,
            None => run(graph, inputs, RunOptions { emulate_fp16: false })?,
        };
        out.extend(predictions(&first_output(outs)?, labels.len())?);
    }
    Ok(out)
}

/// Percentage of `a` equal to `b`, item by item.
fn percent_equal(a: &[usize], b: impl Iterator<Item = usize>) -> f64 {
    100.0 * a.iter().zip(b).filter(|(x, y)| **x == *y).count() as f64 / a.len().max(1) as f64
}

/// ‖a − b‖² / ‖b‖² over two outputs.
fn relative_error(a: &Tensor, b: &Tensor) -> f64 {
    let (Some(a), Some(b)) = (a.as_f32(), b.as_f32()) else { return f64::INFINITY };
    let num: f64 = a.iter().zip(b).map(|(&x, &y)| f64::from(x - y).powi(2)).sum();
    let den: f64 = b.iter().map(|&y| f64::from(y).powi(2)).sum();
    if den > 0.0 { num / den } else { num }
}

/// Chooses the INT8 layers: all candidates calibrated by `thresholds`, minus the most
/// sensitive ones until top-1 accuracy on `data` is within `max_drop` points of FP32.
/// `progress(stage, done, total)` reports each evaluation.
pub fn gate(
    graph: &Graph,
    thresholds: &BTreeMap<String, f32>,
    data: &Labelled,
    opts: GateOptions,
    progress: &mut dyn FnMut(&str, usize, usize),
) -> Result<(Int8Plan, GateReport), GraphError> {
    if data.is_empty() {
        return Err(GraphError::Invalid("the accuracy gate needs labelled data".into()));
    }
    if !(opts.max_drop.is_finite() && opts.max_drop >= 0.0) {
        return Err(GraphError::Invalid(format!("the allowed drop {} must be a number ≥ 0", opts.max_drop)));
    }
    let labels: Vec<usize> = data.batches.iter().flat_map(|(_, l)| l.iter().copied()).collect();
    let accuracy = |p: &[usize]| percent_equal(p, labels.iter().copied());
    progress("FP32 accuracy", 0, 2);
    let fp32_pred = predict(graph, data, None, false)?;
    let fp32 = accuracy(&fp32_pred);
    let full = Int8Plan::new(graph, thresholds, &[])?;
    progress("INT8 accuracy", 1, 2);
    let full_pred = predict(graph, data, Some(&full), opts.fp16)?;
    let ungated = accuracy(&full_pred);
    let mut report = GateReport {
        samples: data.len(),
        fp32_accuracy: fp32,
        int8_accuracy_ungated: ungated,
        int8_accuracy: ungated,
        agreement: percent_equal(&full_pred, fp32_pred.iter().copied()),
        max_drop: opts.max_drop,
        int8_layers: full.nodes.len(),
        kept_fp16: Vec::new(),
        sensitivity: Vec::new(),
    };
    if fp32 - ungated <= opts.max_drop {
        return Ok((full, report));
    }

    // Sensitivity: each layer alone in INT8, against FP32, on the first samples.
    let mut probe = Labelled::default();
    for batch in &data.batches {
        if probe.len() >= opts.sensitivity_samples.max(1) {
            break;
        }
        probe.batches.push(batch.clone());
    }
    let reference = probe
        .batches
        .iter()
        .map(|(inputs, _)| run(graph, inputs, RunOptions::default()).and_then(first_output))
        .collect::<Result<Vec<_>, _>>()?;
    let layers = full.names_in_order(graph);
    let mut sensitivity = Vec::with_capacity(layers.len());
    for (i, name) in layers.iter().enumerate() {
        progress("layer sensitivity", i, layers.len());
        let mut alone = Int8Plan::default();
        if let Some(q) = full.nodes.get(name) {
            alone.nodes.insert(name.clone(), q.clone());
        }
        let mut err = 0.0;
        for ((inputs, _), want) in probe.batches.iter().zip(&reference) {
            err += relative_error(&first_output(alone.run(graph, inputs, false)?)?, want);
        }
        sensitivity.push((name.clone(), err / probe.batches.len().max(1) as f64));
    }
    sensitivity.sort_by(|a, b| b.1.total_cmp(&a.1));
    report.sensitivity = sensitivity.clone();

    // The fewest most-sensitive layers to keep in FP16, in a logarithmic number of
    // evaluations over the whole labelled set (see `fewest`).
    let order: Vec<String> = sensitivity.iter().map(|(name, _)| name.clone()).collect();
    let mut evaluations = 0;
    let search = fewest(order.len(), |k| {
        evaluations += 1;
        // At most 2·⌈log2 n⌉ + 1 evaluations (see `fewest`).
        let most = 2 * order.len().max(1).next_power_of_two().ilog2() as usize + 1;
        progress("keeping sensitive layers in FP16", evaluations, most);
        let plan = Int8Plan::new(graph, thresholds, &order[..k])?;
        let pred = predict(graph, data, Some(&plan), opts.fp16)?;
        let acc = accuracy(&pred);
        Ok((fp32 - acc <= opts.max_drop, (plan, acc, pred)))
    })?;
    let (k, (plan, acc, pred)) = search.map_err(|(_, acc, _)| {
        // Even with no layer in INT8 the plan (FP16) loses more than allowed: say so rather
        // than ship an "INT8" plan that is neither INT8 nor within the bound.
        GraphError::Invalid(format!(
            "the accuracy gate cannot meet a drop of {} points: with every layer kept out of INT8 the plan \
             scores {acc:.2} % against FP32's {fp32:.2} %",
            opts.max_drop
        ))
    })?;
    report.int8_accuracy = acc;
    report.agreement = percent_equal(&pred, fp32_pred.iter().copied());
    let keep = order[..k].to_vec();
    report.kept_fp16 = keep;
    report.int8_layers = plan.nodes.len();
    Ok((plan, report))
}

/// The smallest `k` in `1..=n` for which `eval(k)` holds, by doubling until it holds and then
/// bisecting between the last count that failed and the first that held: about 2·log2(n)
/// evaluations instead of up to n. With `eval` monotone (keeping more layers never hurts)
/// that is the smallest such `k`; accuracy is only roughly monotone, so otherwise it is a
/// small `k` that was checked to hold. `Err` carries `eval(n)`'s value when even that fails
/// (`n == 0`: `eval(0)`).
fn fewest<T>(
    n: usize,
    mut eval: impl FnMut(usize) -> Result<(bool, T), GraphError>,
) -> Result<Result<(usize, T), T>, GraphError> {
    let (mut failing, mut k) = (0, n.min(1));
    let mut held = loop {
        let (ok, value) = eval(k)?;
        if ok {
            break (k, value);
        }
        if k >= n {
            return Ok(Err(value));
        }
        failing = k;
        k = (2 * k).min(n);
    };
    while held.0 - failing > 1 {
        let mid = failing + (held.0 - failing) / 2;
        let (ok, value) = eval(mid)?;
        if ok {
            held = (mid, value);
        } else {
            failing = mid;
        }
    }
    Ok(Ok(held))
}

#[cfg(test)]
mod search_tests {
    use super::*;

    #[test]
    fn fewest_finds_the_threshold_in_logarithmic_evaluations() -> Result<(), GraphError> {
        for n in [1usize, 2, 3, 7, 50, 200] {
            for t in 1..=n {
                let mut calls = 0;
                let got = fewest(n, |k| {
                    calls += 1;
                    Ok((k >= t, k))
                })?;
                assert_eq!(got.ok().map(|(k, _)| k), Some(t), "n {n}, threshold {t}");
                // 2·⌈log2 n⌉ + 1: what the progress bar announces.
                assert!(calls <= 2 * n.next_power_of_two().ilog2() as usize + 1, "n {n} t {t}: {calls} calls");
            }
        }
        Ok(())
    }

    #[test]
    fn fewest_reports_failure_and_only_returns_counts_that_held() -> Result<(), GraphError> {
        // Never holds: the value at n comes back.
        assert_eq!(fewest(9, |k| Ok((false, k)))?, Err(9));
        assert_eq!(fewest(0, |k| Ok((false, k)))?, Err(0));
        // Not monotone: holds at 4 and from 7 on; whatever is returned held.
        let holds = |k: usize| k == 4 || k >= 7;
        let (k, _) = fewest(20, |k| Ok((holds(k), ())))?.map_err(|_| GraphError::Invalid("none".into()))?;
        assert!(holds(k), "{k}");
        Ok(())
    }
}
