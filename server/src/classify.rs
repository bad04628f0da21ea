//! Image classification on top of a model: the preprocessing recipe of `[input]`, and
//! softmax / top-k / labels from `[output]`. Only models whose config has both tables
//! serve `/predict`; every model serves raw tensors through KServe v2.

use std::path::Path;

use kiln_engine::{DType, Dim, ModelMetadata, Tensor, TensorData};
use serde::Serialize;

use crate::config::{InputConfig, ModelConfig, OutputConfig};
use crate::model::ModelInput;
use crate::preprocess::Preprocess;

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Class {
    pub label: String,
    pub class_id: usize,
    pub score: f32,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Prediction {
    pub label: String,
    pub class_id: usize,
    pub score: f32,
    pub top_k: Vec<Class>,
}

#[derive(Debug)]
pub struct Classifier {
    pub preprocess: Preprocess,
    output: OutputConfig,
    labels: Vec<String>,
    output_index: usize,
}

impl Classifier {
    /// Checks the model's signature against the config; errors name the config field.
    pub fn new(
        dir: &Path,
        input: &InputConfig,
        output: &OutputConfig,
        config: &ModelConfig,
        meta: &ModelMetadata,
    ) -> Result<Self, String> {
        let labels = match &output.labels {
            Some(file) => read_labels(&dir.join(file)).map_err(|e| format!("output.labels: {e}"))?,
            None => Vec::new(),
        };
        // A CUDA plan built with a uint8 image input normalises on the GPU.
        let uint8 = meta.inputs.first().is_some_and(|i| i.dtype == DType::U8);
        let preprocess = if uint8 { Preprocess::uint8(input)? } else { Preprocess::new(input)? };
        let output_index = check_signature(input, output, config.max_batch_size, meta, &preprocess, labels.len())?;
        Ok(Self { preprocess, output: output.clone(), labels, output_index })
    }

    /// Turns one request's output tensors into one prediction per item.
    pub fn postprocess(&self, outputs: &[Tensor]) -> Result<Vec<Prediction>, String> {
        let out = outputs.get(self.output_index).ok_or("missing output")?;
        let values = out.as_f32().ok_or("output is not FP32")?;
        let items = out.batch().max(1);
        let classes = values.len() / items;
        if classes == 0 {
            return Err("empty output".into());
        }
        Ok(values.chunks_exact(classes).map(|row| self.predict(row)).collect())
    }

    fn predict(&self, logits: &[f32]) -> Prediction {
        let scores = if self.output.softmax { softmax(logits) } else { logits.to_vec() };
        let mut order: Vec<usize> = (0..scores.len()).collect();
        let k = self.output.top_k.min(order.len());
        // Sort descending by score; NaN (never expected) sorts last instead of panicking.
        order.sort_unstable_by(|&a, &b| scores[b].total_cmp(&scores[a]));
        let top_k: Vec<Class> =
            order[..k].iter().map(|&i| Class { label: self.label(i), class_id: i, score: scores[i] }).collect();
        let best = top_k.first().cloned().unwrap_or(Class { label: String::new(), class_id: 0, score: 0.0 });
        Prediction { label: best.label, class_id: best.class_id, score: best.score, top_k }
    }

    fn label(&self, class: usize) -> String {
        self.labels.get(class).cloned().unwrap_or_else(|| class.to_string())
    }

    /// Builds the input tensor for `items` images already preprocessed into `data`
    /// (`TensorData::F32`, or `TensorData::U8` for a uint8 model input).
    pub fn image_input(&self, items: usize, data: TensorData) -> Result<ModelInput, String> {
        let mut shape = vec![items];
        shape.extend(self.preprocess.item_shape());
        Tensor::new(shape, data).map(|t| ModelInput(vec![t])).map_err(|e| e.to_string())
    }
}

fn softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exps: Vec<f32> = logits.iter().map(|&x| (x - max).exp()).collect();
    let sum: f32 = exps.iter().sum();
    exps.into_iter().map(|e| e / sum).collect()
}

/// The model must take one FP32 image tensor shaped like the preprocessing output, and
/// produce the configured output; returns that output's index.
fn check_signature(
    input_config: &InputConfig,
    output_config: &OutputConfig,
    max_batch_size: usize,
    meta: &ModelMetadata,
    pre: &Preprocess,
    labels: usize,
) -> Result<usize, String> {
    let [input] = meta.inputs.as_slice() else {
        return Err(format!("the model has {} inputs; image models take exactly one", meta.inputs.len()));
    };
    if input.name != input_config.name {
        return Err(format!("input.name: {:?} but the model's input is {:?}", input_config.name, input.name));
    }
    let want = if pre.is_uint8() { DType::U8 } else { DType::F32 };
    if input.dtype != want {
        return Err(format!("input: the model's input is {}, expected {want}", input.dtype));
    }
    let expected = pre.item_shape();
    let fits = input.shape.len() == 4
        && input.shape[1..].iter().zip(expected).all(|(d, e)| matches!(d, Dim::Dynamic) || *d == Dim::Fixed(e));
    if !fits {
        return Err(format!(
            "input.crop/layout: the model's input shape {:?} does not take {expected:?}",
            input.shape_i64()
        ));
    }
    if input.shape[0] != Dim::Dynamic && max_batch_size > 1 {
        return Err("max_batch_size: the model's batch axis is fixed; export it with a dynamic batch axis".into());
    }
    let index = meta
        .outputs
        .iter()
        .position(|o| o.name == output_config.name)
        .ok_or_else(|| format!("output.name: the model has no output {:?}", output_config.name))?;
    let output = &meta.outputs[index];
    if output.dtype != DType::F32 {
        return Err(format!("output: the model's output is {}, expected FP32", output.dtype));
    }
    if let Some(Dim::Fixed(classes)) = output.shape.last()
        && labels > 0
        && *classes != labels
    {
        return Err(format!("output.labels: {labels} labels for {classes} classes"));
    }
    Ok(index)
}

fn read_labels(path: &Path) -> Result<Vec<String>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    Ok(text.lines().map(|l| l.trim().to_string()).collect())
}
