//! INT8 arithmetic as kiln's GPU kernels do it, on the CPU: activations quantised per
//! tensor (ONNX QuantizeLinear: round half to even, saturate to [-128, 127]), weights
//! symmetric per output channel ([-127, 127]), products accumulated exactly in integers,
//! then `acc · (s_x · s_w[k]) + bias + residual` and the activation in FP32, in that order.
//!
//! The exact integer accumulation reuses the FP32 convolution and GEMM: the quantised
//! input is split as `q = 16·hi + lo` (hi ∈ [-8, 7], lo ∈ [0, 15]) and each half runs
//! through the FP32 kernel, where every partial sum is an integer below 2^24 (and so
//! exact in any order) as long as the reduction is shorter than [`MAX_REDUCTION`].

use crate::graph::Node;
use crate::ops::OpDef;
use crate::ops::nn::activation::Activation;
use crate::{Tensor, TensorData};

/// Longest reduction (input channels × kernel area, or K) emulated exactly:
/// 15 · 127 · K < 2^24.
pub const MAX_REDUCTION: usize = (1 << 24) / (15 * 127);

/// Every activation kiln's fused ops accept (the node passed its op's check already).
const ANY_ACTIVATION: &[&str] = &["none", "relu", "clip", "sigmoid", "silu", "tanh", "gelu", "gelu_tanh"];

/// The quantisation of one INT8 node.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeQuant {
    /// Scale of the input activation: `amax / 127`.
    pub input_scale: f32,
    /// One scale per output channel: `max |w_k| / 127`.
    pub weight_scales: Vec<f32>,
}

/// ONNX QuantizeLinear to INT8 with zero point 0.
pub fn quantize(x: f32, scale: f32) -> i32 {
    let q = (x / scale).round_ties_even();
    if q.is_nan() { 0 } else { q.clamp(-128.0, 127.0) as i32 }
}

/// One weight quantised with its channel's scale: symmetric, [-127, 127].
pub fn weight_code(w: f32, scale: f32) -> i8 {
    let q = (w / scale).round_ties_even();
    if q.is_nan() { 0 } else { q.clamp(-127.0, 127.0) as i8 }
}

/// The scale for a clipping threshold; zero thresholds (all-zero tensors) get 1.
pub fn scale_for(amax: f32) -> f32 {
    if amax > 0.0 && amax.is_finite() { amax / 127.0 } else { 1.0 }
}

/// Which weight axis indexes output channels, and the op's reduction length.
pub(crate) fn weight_layout(node: &Node, w: &Tensor) -> Result<(usize, usize), String> {
    let shape = w.shape();
    let (axis, channels) = match node.op.as_str() {
        // OIHW or OHWI: output channels first.
        "kiln.FusedConv" => (0, *shape.first().ok_or("weights of rank 0")?),
        // W is [K, N].
        "kiln.Dense" if shape.len() == 2 => (1, shape[1]),
        other => return Err(format!("{other} has no INT8 form")),
    };
    let reduction = shape.iter().product::<usize>() / channels.max(1);
    Ok((axis, reduction))
}

/// Per-output-channel scales of the weights of an INT8-capable node.
pub fn weight_scales(node: &Node, w: &Tensor) -> Result<Vec<f32>, String> {
    let (axis, _) = weight_layout(node, w)?;
    let data = w.as_f32().ok_or("weights are not FP32")?;
    let channels = w.shape()[axis];
    let inner: usize = w.shape()[axis + 1..].iter().product();
    let mut amax = vec![0f32; channels];
    for (i, &v) in data.iter().enumerate() {
        let k = (i / inner.max(1)) % channels.max(1);
        amax[k] = amax[k].max(v.abs());
    }
    Ok(amax.into_iter().map(scale_for).collect())
}

fn weights_quantised(node: &Node, w: &Tensor, scales: &[f32]) -> Result<Tensor, String> {
    let (axis, _) = weight_layout(node, w)?;
    let data = w.as_f32().ok_or("weights are not FP32")?;
    let channels = w.shape()[axis];
    if scales.len() != channels {
        return Err(format!("{} weight scales for {channels} channels", scales.len()));
    }
    let inner: usize = w.shape()[axis + 1..].iter().product();
    let q = data
        .iter()
        .enumerate()
        .map(|(i, &v)| f32::from(weight_code(v, scales[(i / inner.max(1)) % channels])))
        .collect();
    Tensor::new(w.shape().to_vec(), TensorData::F32(q)).map_err(|e| e.to_string())
}

/// A residual broadcast to the product's shape (kiln.Dense takes any broadcastable one);
/// one that would enlarge the output is refused (such nodes are no INT8 candidates).
fn expand_to(z: &Tensor, shape: &[usize]) -> Result<Vec<f32>, String> {
    let data = z.as_f32().ok_or("residual is not FP32")?;
    if z.shape() == shape {
        return Ok(data.to_vec());
    }
    if crate::ops::util::broadcast_dims(z.shape(), shape)? != shape {
        return Err(format!("residual {:?} does not broadcast to the output {shape:?}", z.shape()));
    }
    let strides = crate::ops::util::broadcast_strides(z.shape(), shape);
    let n: usize = shape.iter().product();
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let (mut rem, mut at) = (i, 0);
        for (axis, &d) in shape.iter().enumerate().rev() {
            at += (rem % d.max(1)) * strides[axis];
            rem /= d.max(1);
        }
        out.push(data[at]);
    }
    Ok(out)
}

/// Whether a kiln.FusedConv / kiln.Dense can run in INT8 here: FP32 constant weights and
/// a reduction short enough to emulate exactly.
pub(crate) fn supported(node: &Node, weights: &Tensor) -> bool {
    weights.as_f32().is_some() && weight_layout(node, weights).is_ok_and(|(_, r)| r <= MAX_REDUCTION)
}

/// The node as a plain product: no bias, no residual, no activation.
fn product_only(node: &Node) -> Node {
    let mut core = node.clone();
    core.inputs.truncate(2);
    core.attrs.insert("activation", crate::graph::Attr::String("none".into()));
    core
}

/// Runs one INT8 node: `inputs` are the FP32 node's (x, weights, bias?, residual?).
pub fn eval(node: &Node, op: &dyn OpDef, inputs: &[Option<&Tensor>], q: &NodeQuant) -> Result<Tensor, String> {
    let x = inputs.first().copied().flatten().ok_or("INT8 node without an input")?;
    let w = inputs.get(1).copied().flatten().ok_or("INT8 node without weights")?;
    let (_, reduction) = weight_layout(node, w)?;
    if reduction > MAX_REDUCTION {
        return Err(format!("reduction of {reduction} exceeds the {MAX_REDUCTION} emulated exactly"));
    }
    let xs = x.as_f32().ok_or("INT8 node input is not FP32")?;
    let (mut hi, mut lo) = (Vec::with_capacity(xs.len()), Vec::with_capacity(xs.len()));
    for &v in xs {
        let q = quantize(v, q.input_scale);
        hi.push(q.div_euclid(16) as f32);
        lo.push(q.rem_euclid(16) as f32);
    }
    let qw = weights_quantised(node, w, &q.weight_scales)?;
    let core = product_only(node);
    let half = |data: Vec<f32>| -> Result<Tensor, String> {
        let t = Tensor::new(x.shape().to_vec(), TensorData::F32(data)).map_err(|e| e.to_string())?;
        let mut out = op.eval(&core, &[Some(&t), Some(&qw)])?;
        if out.is_empty() {
            return Err("the product produced no output".into());
        }
        Ok(out.swap_remove(0))
    };
    let (a, b) = (half(hi)?, half(lo)?);
    let (av, bv) = (a.as_f32().ok_or("non-FP32 product")?, b.as_f32().ok_or("non-FP32 product")?);
    let shape = a.shape().to_vec();
    let channels = q.weight_scales.len();
    // Output channels: axis 1 of NCHW convolutions, the last axis otherwise.
    let nchw = node.op == "kiln.FusedConv" && node.attrs.string("layout", "NCHW")? == "NCHW";
    let inner: usize = if nchw { shape[2..].iter().product() } else { 1 };
    let alpha: Vec<f32> = q.weight_scales.iter().map(|&s| q.input_scale * s).collect();
    let bias = match inputs.get(2).copied().flatten() {
        Some(b) => Some(b.as_f32().ok_or("bias is not FP32")?),
        None => None,
    };
    let residual = match inputs.get(3).copied().flatten() {
        Some(z) => Some(expand_to(z, &shape)?),
        None => None,
    };
    let mut y = Vec::with_capacity(av.len());
    for (i, (&hi, &lo)) in av.iter().zip(bv).enumerate() {
        let acc = 16 * (hi as i64) + lo as i64;
        let k = (i / inner.max(1)) % channels.max(1);
        let mut v = acc as f32 * alpha[k];
        if let Some(b) = bias {
            v += b[k];
        }
        if let Some(z) = &residual {
            v += z[i];
        }
        y.push(v);
    }
    Activation::from_node(node, ANY_ACTIVATION)?.apply(&mut y);
    Tensor::new(shape, TensorData::F32(y)).map_err(|e| e.to_string())
}
