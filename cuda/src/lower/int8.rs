//! INT8 layers: kiln.FusedConv and kiln.Dense nodes that carry a calibrated
//! `int8_input_scale` (see `kiln_engine::quant`) run as
//!
//! 1. `kiln_quantize`: the FP16/FP32 input to INT8 (skipped when the producer
//!    already wrote INT8: fused requantisation, below), rows of channels padded
//!    with zeros to a multiple of 4;
//! 2. the integer product into exact sums — cuBLASLt INT8 GEMM (INT32) for
//!    dense layers and stride-1 1×1 convolutions, cuDNN's INT8 convolution
//!    (sums as FP32) for other ungrouped ones, `kiln_dwconv_i8` (INT32) for
//!    depthwise ones;
//! 3. `kiln_requant`: `sum · s_x·s_w[k] + bias + residual`, the activation,
//!    then FP16/FP32 — or INT8 with the next layer's input scale when every
//!    reader of the output is an INT8 layer with that scale.
//!
//! That is the arithmetic of the engine's INT8 emulation step for step, so a
//! layer's output matches the reference executor's bit for bit given the same
//! input. Weights are quantised here, per output channel, from the plan's FP32
//! weights and scales; output channels are padded to a multiple of 4 too (zero
//! filters), the requantiser reading only the real ones.

use kiln_engine::graph::{Attr, Dim, Node, Precision, ValueId};
use kiln_engine::quant::{INPUT_SCALE, WEIGHT_SCALES, int8::weight_code};
use std::collections::HashSet;

use super::analysis::{Builder, DevOp, DevOpKind, Storage, precision_elem};
use super::emit::{Emitter, StepKind, View};
use crate::CudaError;
use crate::blas::{GemmArgs, GemmElem, GemmSpec};
use crate::dnn::{ConvArgs, ConvElem, ConvLayout, ConvSpec};
use crate::kernels::{DwConvI8Args, Elem, EwOp, EwProgram, Int8Act, Int8Out, QuantizeArgs, RequantArgs};

/// How an INT8 layer computes its sums.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Int8Form {
    /// cuBLASLt: Y[M, N] = X[M, K] · Wᵀ with W stored [N, K].
    Gemm,
    /// cuDNN, NHWC, one group.
    Conv,
    /// `kiln_dwconv_i8`, one filter per channel.
    Depthwise,
}

/// Geometry of a convolution layer (unused by GEMMs): kernel, strides, dilations, pads [t, l, b, r].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ConvGeometry {
    pub kernel: [usize; 2],
    pub strides: [usize; 2],
    pub dilations: [usize; 2],
    pub pads: [usize; 4],
}

/// One INT8 layer as lowered; the `usize` fields name device tensors (`Analysis::dvals`).
#[derive(Debug, Clone)]
pub struct Int8Layer {
    pub node: usize,
    pub form: Int8Form,
    pub geometry: ConvGeometry,
    pub input_scale: f32,
    /// Input channels, and the row width they are quantised into.
    pub channels: usize,
    pub padded: usize,
    /// Output channels, and the accumulator row width.
    pub out_channels: usize,
    pub out_padded: usize,
    pub act: Int8Act,
    /// Activations the requantiser cannot apply, run on an FP32 copy afterwards.
    pub post_act: ActOps,
    pub out: Int8Out,
    /// The input as read: FP16/FP32, or INT8 from a fused producer.
    pub x: usize,
    /// The quantised input (`None`: `x` itself is INT8).
    pub qx: Option<usize>,
    /// Whether this layer quantises `x` into `qx` (else an earlier reader did, or the
    /// producer wrote `qx` beside its FP16 output).
    pub quantize: bool,
    /// The quantised input with its asymmetric spatial padding materialised (cuDNN pads
    /// symmetrically), and where the input starts in it.
    pub padded_x: Option<(usize, [usize; 4])>,
    pub w: usize,
    pub acc: usize,
    pub alpha: usize,
    pub bias: Option<usize>,
    pub residual: Option<usize>,
    /// The residual broadcast to the output's shape, when its shape is not the output's.
    pub residual_full: Option<usize>,
    /// FP32 requantised output before `post_act`.
    pub pre_act: Option<usize>,
    pub y: usize,
    /// The output also written in INT8 for its INT8 readers: (tensor, their input scale,
    /// rounded to FP16 first).
    pub also_i8: Option<(usize, f32, bool)>,
}

/// An activation as elementwise ops on one register: (op, immediate 0, immediate 1).
pub type ActOps = Vec<(EwOp, f32, f32)>;

/// Fewest activation rows an INT8 GEMM is run with: smaller batches are padded (the extra
/// rows' sums are never read). cuBLASLt documents no minimum, but its integer kernels have
/// been seen to refuse very small ones (PyTorch's `_int_mm` requires more than 16 rows), and
/// a dense head at batch 1 must still run.
pub const GEMM_MIN_ROWS: usize = 32;

/// Arena storage; the offset is assigned by the layout pass.
const ARENA: Storage = Storage::Arena { offset: 0 };

fn with_last(shape: &[Dim], last: usize) -> Vec<Dim> {
    let mut s = shape.to_vec();
    if let Some(d) = s.last_mut() {
        *d = Dim::fixed(last as i64);
    }
    s
}

fn pair(node: &Node, name: &str) -> Result<[usize; 2], String> {
    match node.attrs.ints(name)? {
        None => Ok([1, 1]),
        Some(&[a, b]) if a >= 1 && b >= 1 => Ok([a as usize, b as usize]),
        Some(v) => Err(format!("{name} {v:?}")),
    }
}

/// The activation the requantiser applies, and what it leaves to an elementwise pass.
fn activation(node: &Node) -> Result<(Int8Act, ActOps), String> {
    Ok(match node.attrs.string("activation", "none")?.as_str() {
        "none" => (Int8Act::None, vec![]),
        "relu" => (Int8Act::Relu, vec![]),
        "clip" => {
            let lo = node.attrs.float("clip_min", f32::NEG_INFINITY)?;
            let hi = node.attrs.float("clip_max", f32::INFINITY)?;
            (Int8Act::Clip { lo, hi }, vec![])
        }
        _ => (Int8Act::None, super::ops::activation_ops(node).map_err(|e| e.to_string())?),
    })
}

/// Form, geometry, input channels and output channels of an INT8 node.
fn classify(node: &Node, w: &[usize]) -> Result<(Int8Form, ConvGeometry, usize, usize), String> {
    if w.contains(&0) {
        return Err(format!("weights of shape {w:?}"));
    }
    if node.op == "kiln.Dense" {
        let [k, n] = <[usize; 2]>::try_from(w).map_err(|_| "dense weights must be 2-D")?;
        return Ok((Int8Form::Gemm, ConvGeometry::default(), k, n));
    }
    if node.attrs.string("layout", "NCHW")? != "NHWC" {
        return Err("INT8 convolutions run channels-last: build the plan with the NHWC layout".into());
    }
    let auto_pad = node.attrs.string("auto_pad", "NOTSET")?;
    if !matches!(auto_pad.as_str(), "NOTSET" | "VALID") {
        return Err(format!("auto_pad {auto_pad} (padding known only at run time)"));
    }
    let [k, r, s, ci] = <[usize; 4]>::try_from(w).map_err(|_| "convolution weights must be OHWI")?;
    let group = node.attrs.int("group", 1)?.max(1) as usize;
    let pads = match node.attrs.ints("pads")? {
        None => [0; 4],
        Some(&[t, l, b, rr]) if [t, l, b, rr].iter().all(|&p| p >= 0) => [t, l, b, rr].map(|p| p as usize),
        Some(p) => return Err(format!("pads {p:?}")),
    };
    let g = ConvGeometry { kernel: [r, s], strides: pair(node, "strides")?, dilations: pair(node, "dilations")?, pads };
    let c = ci * group;
    let form = if group == 1 && [r, s] == [1, 1] && g.strides == [1, 1] && pads == [0; 4] {
        Int8Form::Gemm
    } else if group == 1 {
        Int8Form::Conv
    } else if ci == 1 && k == group {
        Int8Form::Depthwise
    } else {
        return Err(format!("grouped convolution ({group} groups of {ci} channels) has no INT8 form on the GPU"));
    };
    Ok((form, g, c, k))
}

/// INT8 weights in the layout of `form`, output channels padded to `kp`, input channels to `cp`.
fn quantised_weights(form: Int8Form, w: &[f32], shape: &[usize], scales: &[f32], (kp, cp): (usize, usize)) -> Vec<u8> {
    let code = |v: f32, s: f32| weight_code(v, s) as u8;
    match form {
        Int8Form::Gemm if shape.len() == 2 => {
            // Dense [K, N] → [Np, Kp].
            let (k, n) = (shape[0], shape[1]);
            let mut out = vec![0u8; kp * cp];
            for o in 0..n {
                for i in 0..k {
                    out[o * cp + i] = code(w[i * n + o], scales[o]);
                }
            }
            out
        }
        Int8Form::Depthwise => {
            w.iter().enumerate().map(|(i, &v)| code(v, scales[i / (w.len() / scales.len())])).collect()
        }
        _ => {
            // OHWI [K, R, S, C] → [Kp, R, S, Cp].
            let c = shape[shape.len() - 1];
            let taps = w.len() / (shape[0] * c);
            let mut out = vec![0u8; kp * taps * cp];
            for (row, chunk) in w.chunks_exact(c).enumerate() {
                let o = row / taps;
                for (i, &v) in chunk.iter().enumerate() {
                    out[row * cp + i] = code(v, scales[o]);
                }
            }
            out
        }
    }
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

impl Builder<'_> {
    /// Plans INT8 node `i` (see the module docs); issues instead when it cannot run in INT8.
    pub(super) fn int8_node(&mut self, i: usize, host: &HashSet<ValueId>) {
        if let Err(why) = self.try_int8_node(i, host) {
            self.issue(i, format!("INT8: {why}"));
        }
    }

    fn try_int8_node(&mut self, i: usize, host: &HashSet<ValueId>) -> Result<(), String> {
        let g = self.graph;
        let node = &g.nodes[i];
        let (Some(Attr::Float(input_scale)), Some(Attr::Floats(scales))) =
            (node.attrs.get(INPUT_SCALE), node.attrs.get(WEIGHT_SCALES))
        else {
            return Err("scales missing or malformed".into());
        };
        let weights = node.input(1).and_then(|v| g.values[v].constant.clone()).ok_or("weights must be constant")?;
        let w = weights.as_f32().ok_or("weights must be FP32")?;
        let (form, geometry, channels, out_channels) = classify(node, weights.shape())?;
        if scales.len() != out_channels || !(input_scale.is_finite() && *input_scale > 0.0) {
            return Err(format!(
                "{} weight scales for {out_channels} channels, input scale {input_scale}",
                scales.len()
            ));
        }
        let (act, post_act) = activation(node)?;
        let elem = precision_elem(node.precision);
        let v0 = node.input(0).ok_or("no input")?;
        let mut x = self.input_dval(i, v0, host).ok_or("input")?;
        let fused_in = self.a.dvals[x].elem == Elem::I8;
        if !fused_in {
            x = self.convert(i, x, elem).ok_or("input conversion")?;
        }
        let xshape = self.a.dvals[x].shape.clone();
        if xshape.last().and_then(Dim::as_fixed) != Some(channels as i64) {
            return Err(format!("input {} is not channels-last with {channels} channels", self.a.dvals[x].name));
        }
        let padded = if form == Int8Form::Depthwise { channels } else { channels.next_multiple_of(4) };
        let out_padded = if form == Int8Form::Depthwise { out_channels } else { out_channels.next_multiple_of(4) };
        if fused_in && padded != channels {
            return Err("an INT8 input needs no channel padding".into());
        }
        let name = &node.name;
        let mut outs = Vec::new();
        // What the op reads, for the tensors' lifetimes: an input quantised by an earlier
        // reader (or written in INT8 by its producer) is read only as that INT8 copy.
        let mut ins = Vec::new();
        let key = (x, input_scale.to_bits(), padded);
        let (qx, quantize) = match self.quantized.get(&key) {
            _ if fused_in => {
                ins.push(Some(x));
                (None, false)
            }
            Some(&q) => {
                ins.push(Some(q));
                (Some(q), false)
            }
            None => {
                let q = self.new_dval(format!("{name}:qx"), Elem::I8, with_last(&xshape, padded), ARENA);
                let q = q.ok_or("quantised input has a shape the profiles do not bound")?;
                self.quantized.insert(key, q);
                ins.push(Some(x));
                outs.push(q);
                (Some(q), true)
            }
        };
        let [t, l, b, r] = geometry.pads;
        let padded_x = if form == Int8Form::Conv && (t != b || l != r) {
            let mut shape = with_last(&xshape, padded);
            for (axis, extra) in [(1, t + b), (2, l + r)] {
                let size = shape.get(axis).and_then(Dim::as_fixed).ok_or("asymmetric padding of a dynamic axis")?;
                shape[axis] = Dim::fixed(size + extra as i64);
            }
            let d = self.new_dval(format!("{name}:qx-pad"), Elem::I8, shape, ARENA).ok_or("padding")?;
            outs.push(d);
            Some((d, [0, t, l, 0]))
        } else {
            None
        };
        let wq = quantised_weights(form, w, weights.shape(), scales, (out_padded, padded));
        let wshape = vec![Dim::fixed(out_padded as i64), Dim::fixed((wq.len() / out_padded) as i64)];
        let wd = self.push_weight(format!("{name}:w-int8"), Elem::I8, wshape, &wq);
        let alpha: Vec<f32> = scales.iter().map(|&s| input_scale * s).collect();
        let k_dim = vec![Dim::fixed(out_channels as i64)];
        let alpha = self.push_weight(format!("{name}:alpha"), Elem::F32, k_dim.clone(), &f32_bytes(&alpha));
        let bias = match node.input(2) {
            None => None,
            Some(v) => {
                let t = g.values[v].constant.as_deref().ok_or("bias must be constant")?;
                let data = t.as_f32().ok_or("bias must be FP32")?;
                if data.len() != out_channels {
                    return Err(format!("{} bias values for {out_channels} channels", data.len()));
                }
                Some(self.push_weight(format!("{name}:bias-f32"), Elem::F32, k_dim, &f32_bytes(data)))
            }
        };
        let o = *node.outputs.first().ok_or("no output")?;
        let yshape = g.values[o].ty.as_ref().and_then(|t| t.shape.clone()).ok_or("output without a shape")?;
        let (residual, residual_full) = match node.input(3) {
            None => (None, None),
            Some(v) => {
                let z = self.input_dval(i, v, host).ok_or("residual")?;
                let z = self.convert(i, z, elem).ok_or("residual conversion")?;
                // kiln.Dense takes any broadcastable residual (position embeddings); the
                // requantiser reads one value per output, so it gets a full-size copy.
                let full = if self.a.dvals[z].shape == yshape {
                    None
                } else {
                    let d = self.new_dval(format!("{name}:residual"), elem, yshape.clone(), ARENA);
                    let d = d.ok_or("broadcast residual")?;
                    outs.push(d);
                    Some(d)
                };
                (Some(z), full)
            }
        };
        let acc_elem = if form == Int8Form::Conv { Elem::F32 } else { Elem::I32 };
        let acc = self.new_dval(format!("{name}:acc"), acc_elem, with_last(&yshape, out_padded), ARENA);
        let acc = acc.ok_or("accumulators have a shape the profiles do not bound")?;
        outs.push(acc);
        if form == Int8Form::Gemm {
            // Room for GEMM_MIN_ROWS rows of input and sums (see there).
            let root = self.a.root(qx.unwrap_or(x));
            for (d, row) in [(root, padded), (acc, out_padded * 4)] {
                self.a.dvals[d].bytes = self.a.dvals[d].bytes.max(GEMM_MIN_ROWS * row);
            }
        }
        let fused_out = if post_act.is_empty() { self.fused_output(i, o) } else { None };
        let (out, y_elem) = match (fused_out, elem) {
            (Some((scale, via_f16)), _) => (Int8Out::I8 { scale, via_f16 }, Elem::I8),
            (None, Elem::F16) => (Int8Out::F16, Elem::F16),
            (None, _) => (Int8Out::F32, Elem::F32),
        };
        let pre_act = if post_act.is_empty() {
            None
        } else {
            let d = self.new_dval(format!("{name}:pre-act"), Elem::F32, yshape.clone(), ARENA);
            let d = d.ok_or("output")?;
            outs.push(d);
            Some(d)
        };
        let (out, y_elem) = if pre_act.is_some() { (Int8Out::F32, elem) } else { (out, y_elem) };
        let y = self.new_dval(g.values[o].name.clone(), y_elem, yshape.clone(), ARENA).ok_or("output")?;
        self.a.value_dval.insert(o, y);
        outs.insert(0, y);
        // Readers that would quantise this output find its INT8 copy already written.
        let also_i8 = match (fused_out, &pre_act) {
            (None, None) => match self.int8_readers_scale(o, y_elem, out_channels) {
                Some(scale) => {
                    let d = self.new_dval(format!("{name}:y-int8"), Elem::I8, yshape, ARENA).ok_or("output")?;
                    outs.push(d);
                    self.quantized.insert((y, scale.to_bits(), out_channels), d);
                    Some((d, scale, y_elem == Elem::F16))
                }
                None => None,
            },
            _ => None,
        };
        self.a.int8.push(Int8Layer {
            node: i,
            form,
            geometry,
            input_scale: *input_scale,
            channels,
            padded,
            out_channels,
            out_padded,
            act,
            post_act,
            out,
            x,
            qx,
            quantize,
            padded_x,
            w: wd,
            acc,
            alpha,
            bias,
            residual,
            residual_full,
            pre_act,
            y,
            also_i8,
        });
        ins.extend([Some(wd), Some(alpha), bias, residual]);
        self.a.ops.push(DevOp { kind: DevOpKind::Int8(self.a.int8.len() - 1), ins, outs });
        Ok(())
    }

    /// The input scale of the INT8 layers that read output `o` (stored as `y_elem`, with
    /// `channels`) as their input 0 in the same element type and without channel padding,
    /// when there are any: the most common one if they differ.
    fn int8_readers_scale(&self, o: ValueId, y_elem: Elem, channels: usize) -> Option<f32> {
        let g = self.graph;
        let mut scales: Vec<(u32, usize)> = Vec::new();
        for &c in self.consumers.get(&o)? {
            let n = &g.nodes[c];
            let Some(Attr::Float(s)) = n.attrs.get(INPUT_SCALE) else { continue };
            let depthwise = n.attrs.int("group", 1).ok().is_some_and(|grp| grp > 1);
            if n.input(0) != Some(o)
                || precision_elem(n.precision) != y_elem
                || (!depthwise && !channels.is_multiple_of(4))
            {
                continue;
            }
            match scales.iter_mut().find(|(b, _)| *b == s.to_bits()) {
                Some((_, count)) => *count += 1,
                None => scales.push((s.to_bits(), 1)),
            }
        }
        scales.iter().max_by_key(|(_, count)| *count).map(|(b, _)| f32::from_bits(*b))
    }

    /// `Some((scale, via_f16))` when every reader of INT8 node `i`'s output `o` is an INT8
    /// layer quantising it (input 0 only) with one scale and no channel padding: `i` then
    /// writes INT8 directly. `via_f16`: the readers would have seen an FP16 value.
    fn fused_output(&self, i: usize, o: ValueId) -> Option<(f32, bool)> {
        let g = self.graph;
        let readers = self.consumers.get(&o)?;
        if g.is_output(o) || readers.is_empty() {
            return None;
        }
        let channels = g.values[o].ty.as_ref()?.shape.as_ref()?.last()?.as_fixed()? as usize;
        let mut found: Option<(f32, bool)> = None;
        for &c in readers {
            let n = &g.nodes[c];
            let Some(Attr::Float(s)) = n.attrs.get(INPUT_SCALE) else { return None };
            let only_input0 = n.input(0) == Some(o) && n.inputs.iter().skip(1).all(|v| *v != Some(o));
            let depthwise = n.attrs.int("group", 1).ok()? > 1;
            if !only_input0 || (!depthwise && !channels.is_multiple_of(4)) {
                return None;
            }
            let via_f16 = g.nodes[i].precision == Precision::F16 || n.precision == Precision::F16;
            match found {
                None => found = Some((*s, via_f16)),
                Some(f) if f.0.to_bits() == s.to_bits() && f.1 == via_f16 => {}
                Some(_) => return None,
            }
        }
        found
    }
}

/// Emits INT8 layer `layer`: quantise, (pad), product, requantise, (activation).
pub(super) fn emit_int8(e: &mut Emitter<'_>, layer: &Int8Layer) -> Result<(), CudaError> {
    let node = &e.graph.nodes[layer.node];
    let bad = |why: String| CudaError::InvalidArgument(format!("{} (INT8 {}): {why}", node.name, node.op));
    let y = e.view(layer.y)?;
    if y.numel() == 0 {
        return Ok(());
    }
    let x = e.view(layer.x)?;
    let mut q = x.clone();
    if let Some(qx) = layer.qx {
        q = e.view(qx)?;
    }
    if layer.quantize {
        let args = QuantizeArgs {
            src: x.ptr,
            src_elem: x.elem,
            dst: q.ptr,
            n: q.numel(),
            scale: layer.input_scale,
            channels: layer.channels,
            padded: layer.padded,
        };
        e.push(node, StepKind::Quantize(args));
    }
    if let Some((d, at)) = layer.padded_x {
        let dst = e.view(d)?;
        super::emit::pad_copy(e, &node.name, &q, &dst, at)?;
        q = dst;
    }
    let acc = e.view(layer.acc)?;
    let w = e.view(layer.w)?;
    let g = &layer.geometry;
    match layer.form {
        Int8Form::Gemm => {
            let m = (q.numel() / layer.padded).max(GEMM_MIN_ROWS);
            let spec = GemmSpec::row_major(m as u64, layer.padded as u64, layer.out_padded as u64, true, GemmElem::I8);
            let args = GemmArgs { a: w.ptr, b: q.ptr, c: None, d: acc.ptr, bias: None };
            e.push(node, StepKind::Gemm { spec, args });
        }
        Int8Form::Conv => {
            let ([n, h, wd, c], [_, _, _, k]) = (dims4(&q.dims).map_err(&bad)?, dims4(&acc.dims).map_err(&bad)?);
            let mut spec = ConvSpec::new([n, c, h, wd], k, g.kernel, ConvLayout::Nhwc, ConvElem::I8);
            if layer.padded_x.is_none() {
                spec.pad_h = g.pads[0];
                spec.pad_w = g.pads[1];
            }
            [spec.stride_h, spec.stride_w] = g.strides;
            [spec.dil_h, spec.dil_w] = g.dilations;
            if spec.output_hw()? != (acc.dims[1], acc.dims[2]) {
                return Err(bad(format!("cuDNN computes {:?}, the plan {:?}", spec.output_hw()?, &acc.dims[1..3])));
            }
            let zeros = e.analysis.zeros_offset.ok_or_else(|| bad("no zero bias planned".into()))?;
            let args = ConvArgs { x: q.ptr, w: w.ptr, bias: e.bases.weights + zeros as u64, z: None, y: acc.ptr };
            e.push(node, StepKind::Conv { spec, args });
        }
        Int8Form::Depthwise => {
            let ([n, h, wd, c], [_, p, oq, _]) = (dims4(&q.dims).map_err(&bad)?, dims4(&acc.dims).map_err(&bad)?);
            let out = |size: usize, pad: usize, k: usize, stride: usize, dil: usize| {
                (size + pad).checked_sub(dil * (k - 1) + 1).map(|span| span / stride + 1)
            };
            let [pt, pl, pb, pr] = g.pads;
            let want = (
                out(h, pt + pb, g.kernel[0], g.strides[0], g.dilations[0]),
                out(wd, pl + pr, g.kernel[1], g.strides[1], g.dilations[1]),
            );
            if want != (Some(p), Some(oq)) {
                return Err(bad(format!("the padding gives {want:?}, the plan [{p}, {oq}]")));
            }
            let args = DwConvI8Args {
                x: q.ptr,
                w: w.ptr,
                y: acc.ptr,
                n,
                c,
                h,
                w_in: wd,
                out: [p, oq],
                kernel: g.kernel,
                strides: g.strides,
                pads: [g.pads[0], g.pads[1]],
                dilations: g.dilations,
            };
            e.push(node, StepKind::DwConvI8(args));
        }
    }
    let out = match layer.pre_act {
        Some(d) => e.view(d)?,
        None => y.clone(),
    };
    let mut residual = layer.residual.map(|z| e.view(z)).transpose()?;
    if let (Some(z), Some(full)) = (&residual, layer.residual_full)
        && z.dims != y.dims
    {
        let full = e.view(full)?;
        let strides = super::ops::broadcast_strides(&z.dims, &y.dims)
            .ok_or_else(|| bad(format!("residual {:?} does not broadcast to {:?}", z.dims, y.dims)))?;
        let copy = crate::kernels::CopyArgs::contiguous(full.ptr, z.ptr, z.elem.size(), &y.dims, &strides);
        e.push(node, StepKind::Copy(copy));
        residual = Some(full);
    }
    let args = RequantArgs {
        acc: acc.ptr,
        acc_elem: acc.elem,
        acc_ld: layer.out_padded,
        out: out.ptr,
        out_kind: layer.out,
        alpha: e.view(layer.alpha)?.ptr,
        bias: layer.bias.map(|b| e.view(b)).transpose()?.map(|b| b.ptr),
        residual: residual.map(|z| (z.ptr, z.elem)),
        n: y.numel(),
        channels: layer.out_channels,
        inner: 1,
        act: layer.act,
        also_i8: match layer.also_i8 {
            Some((d, scale, via_f16)) => Some((e.view(d)?.ptr, scale, via_f16)),
            None => None,
        },
    };
    e.push(node, StepKind::Requant(args));
    if layer.pre_act.is_some() {
        post_activation(e, node, &out, &y, &layer.post_act)?;
    }
    Ok(())
}

fn dims4(d: &[usize]) -> Result<[usize; 4], String> {
    <[usize; 4]>::try_from(d).map_err(|_| format!("expected a 4-D NHWC tensor, got {d:?}"))
}

/// `y = act(src)` for the activations the requantiser does not apply.
fn post_activation(
    e: &mut Emitter<'_>,
    node: &Node,
    src: &View,
    y: &View,
    act: &[(EwOp, f32, f32)],
) -> Result<(), CudaError> {
    let mut b = EwProgram::builder(&y.dims, y.ptr, y.elem);
    let mut r = b.input(src.ptr, src.elem, &crate::kernels::row_major_strides(&src.dims));
    for &(op, i0, i1) in act {
        r = b.op(op, r, 0, 0, i0, i1);
    }
    let _ = r;
    e.push(node, StepKind::Elementwise(Box::new(b.finish()?)));
    Ok(())
}

#[cfg(test)]
#[path = "int8_tests.rs"]
mod tests;
